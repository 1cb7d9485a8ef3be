"""One writer per run dir: a lock file naming the live run (pid, host), and the clean-up of
temp files a killed run left behind."""
import fcntl
import json
import logging
import os
import socket
import time

from ..errors import UserError
from .resume import resume_hint

log = logging.getLogger("octconv_exp")

LOCK_FILE = ".lock"
#: The files written atomically (outputs.atomic_write: ".<name>.<random>" beside them).
ATOMIC_NAMES = ("metrics.json", "epochs.csv", "model.pt", "last.pt", "best.pt")


class RunDirBusy(UserError):
    """Another live run writes into this run dir."""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def read_lock(output_dir):
    """The lock's holder as a dict, or None (no lock, or an unreadable one)."""
    try:
        with open(os.path.join(output_dir, LOCK_FILE)) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def live_holder(output_dir):
    """The live run writing into ``output_dir`` (another process), or None."""
    holder = read_lock(output_dir)
    if holder is None or holder.get("pid") == os.getpid():
        return None
    if holder.get("host") != socket.gethostname():
        return holder  # cannot tell from here: assume it runs
    return holder if _alive(int(holder.get("pid", -1))) else None


def describe(holder, output_dir):
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return (f"{output_dir} is being written by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {since}); wait for it to end or choose another "
            f"hydra.run.dir (if that run is gone, delete {os.path.join(output_dir, LOCK_FILE)})")


class RunDirLock:
    """Held while a run writes into its dir; a stale lock (its process gone) is taken over."""

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = False

    def __enter__(self):
        os.makedirs(self.output_dir, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.time()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = live_holder(self.output_dir)
                if holder is not None:
                    raise RunDirBusy(describe(holder, self.output_dir)) from None
                stale = read_lock(self.output_dir) or {}
                if stale.get("pid") != os.getpid():
                    log.warning("Taking over %s: its run (pid %s on %s) is gone", self.path,
                                stale.get("pid"), stale.get("host"))
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record + "\n")
            self.held = True
            clean_orphans(self.output_dir)
            return self
        raise UserError(f"cannot take the lock {self.path}: another run keeps taking it")

    def __exit__(self, *exc):
        if self.held and (read_lock(self.output_dir) or {}).get("pid") == os.getpid():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.held = False
        return False


def clean_orphans(output_dir):
    """Remove the temp files of atomic writes a killed run left (only under our lock)."""
    removed = []
    for folder in (output_dir, os.path.join(output_dir, "checkpoints")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if any(name.startswith(f".{target}.") for target in ATOMIC_NAMES):
                try:
                    os.unlink(os.path.join(folder, name))
                    removed.append(name)
                except OSError:
                    pass
    if removed:
        log.warning("Removed %d temp file(s) a stopped run left in %s", len(removed), output_dir)
    return removed


#: What a run leaves that a later run could build on: its checkpoints and final model.
TRAINED_STATE = (os.path.join("checkpoints", "last.pt"), os.path.join("checkpoints", "best.pt"),
                 "model.pt")


def record_in_the_way(output_dir):
    """Why a fresh run (neither resume=true nor train=false) may not start in ``output_dir``,
    or None. A dir holding a run's record (``metrics.json``) would get a new run's
    ``.hydra/`` files and ``metrics.json`` beside the old run's checkpoints and ``model.pt``.
    The record of a run that ended before it trained anything and left nothing to build on (a
    failed or interrupted start-up, whose line says "start the run again") may be replaced."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        status = record.get("status")
        epochs = int(record.get("epochs_completed") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        status, epochs = "unreadable", None
    left = [name for name in TRAINED_STATE if os.path.exists(os.path.join(output_dir, name))]
    if status in ("failed", "interrupted") and epochs == 0 and not left:
        return None

    what = f"metrics.json status {status}"
    if epochs:
        what += f", {epochs} epoch{'s' if epochs != 1 else ''}"
    if left:
        return (f"hydra.run.dir={output_dir} holds a run's record ({what}), which a new run "
                f"would replace: resume it ({resume_hint(output_dir)}), or pick another dir")
    return (f"hydra.run.dir={output_dir} holds a run's record ({what}), which a new run would "
            "replace: pick another dir (or delete that one)")

# ------------------------------------------------------------------------------ sweep dirs

SWEEP_LOCK_FILE = ".sweep.lock"
#: The sweep dir lock this process holds (its open file keeps the flock until the process
#: exits: the report, written after the sweeper returns, is under it too).
_HELD_SWEEP_LOCKS = {}


class SweepDirBusy(UserError):
    """Another live sweep (or search) runs in this sweep dir."""


def lock_sweep_dir(sweep_dir):
    """Hold ``<sweep dir>/.sweep.lock`` (an flock, released when this process ends, also by
    kill -9) for the rest of this process; SweepDirBusy naming the holder if another process
    holds it. One sweep process at a time per sweep dir: a second one would re-queue the
    first's live trials and write into its jobs' dirs."""
    path = os.path.join(os.path.abspath(sweep_dir), SWEEP_LOCK_FILE)
    if path in _HELD_SWEEP_LOCKS:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by workers (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        raise SweepDirBusy(
            f"hydra.sweep.dir={sweep_dir}: another sweep runs in it (pid {holder.get('pid')} on "
            f"{holder.get('host')}, since {since}); wait for it to end or choose another "
            "hydra.sweep.dir") from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": time.time()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    _HELD_SWEEP_LOCKS[path] = fd
    return path
