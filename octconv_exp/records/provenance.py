"""Which code produced a record: the git commit of the octconv-exp checkout the package was
imported from, and whether its tracked files differed from that commit."""
import functools
import os
import subprocess

#: Seconds one git command may take (a network file system, a huge tree): past it, unknown.
GIT_TIMEOUT_S = 10
#: Variables that would point git at another repository than the one around the package
#: (set inside git hooks, or by a user's shell).
_GIT_LOCATION_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                      "GIT_COMMON_DIR", "GIT_CEILING_DIRECTORIES")
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(source_dir, *args):
    """git's stdout in ``source_dir``, or None where git is missing, fails or hangs."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env["GIT_OPTIONAL_LOCKS"] = "0"  # `git status` must not take the index lock of a live checkout
    try:
        done = subprocess.run(["git", *args], cwd=source_dir, env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode("utf-8", "replace")


def git_state(source_dir):
    """``{"commit": SHA, "dirty": bool}`` of the git checkout whose tracked files include
    ``source_dir/__init__.py``; both None otherwise (no git, not a checkout, or a package
    installed into some other repository's tree, e.g. a venv inside a user's project).
    Untracked files do not make the tree dirty: only a change to what the commit holds does."""
    unknown = {"commit": None, "dirty": None}
    if _git(source_dir, "ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return unknown
    commit = _git(source_dir, "rev-parse", "--verify", "HEAD")
    status = _git(source_dir, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return unknown
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def code_version():
    """:func:`git_state` of this package, looked up once per process: every record a process
    writes names the same code (the code it imported, unless the tree changed before the first
    record was written)."""
    return dict(_package_state())


@functools.lru_cache(maxsize=None)
def _package_state():
    return git_state(PACKAGE_DIR)
