"""``python -S forkclient.py [-u] SCRIPT ARGS...``: run ``python [-u] SCRIPT ARGS`` through the
tests' fork server (forkserver.py), for programs another program starts: torchrun's ranks
(``torchrun --no-python ... python -S forkclient.py -u run.py ...``, what torchrun runs
for ``torchrun ... run.py ...`` with ``-u`` added), and a joblib sweep's loky workers (the
served sweep's ``sys.executable`` is a script that runs this: ForkServer.spawn's
``python_children``).

This process stands in for the program: it passes its standard streams, the other descriptors
it was started with (loky's pipes, at the same numbers), working directory, environment and
arguments to the server at ``$OCTCONV_EXP_TEST_FORKSERVER_SOCKET``; the server forks the
program from its warm state (or refuses, and then this process becomes
``python [-u] SCRIPT ARGS`` itself, with exec; so do python options other than ``-u`` and
``-m``, e.g. the resource trackers' ``-c``). Signals sent to this process (torchrun's
SIGTERM to its ranks, a terminal's Ctrl-C to the sweep's process group) go to the program;
this process ends as the program ended: its exit status, or killed by the same signal. Killed
itself (SIGKILL), its connection closes and the server kills the program. Standard library
only (``-S``: no site-packages, a fast start).
"""
import array
import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)


def fresh(argv, why):
    """Become ``python ARGV``: the program without the server (OCTCONV_EXP_TEST_FORKSERVER_LOG:
    written down there, and why)."""
    log = os.environ.get("OCTCONV_EXP_TEST_FORKSERVER_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}: forkclient.py "
                    f"{' '.join(argv[:3])}: {why}\n")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + argv)


def inherited_fds():
    """The open file descriptors above the standard streams this process was started with
    (what a parent passed on, as loky passes a worker its pipes: ``pass_fds``)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.fstat(fd)
            except OSError:  # listdir's own descriptor, closed by now
                continue
            found.append(fd)
    return sorted(found)


def main(argv):
    unbuffered = argv[:1] == ["-u"]
    extra = inherited_fds()
    path = os.environ.get("OCTCONV_EXP_TEST_FORKSERVER_SOCKET")
    program = argv[1:] if unbuffered else argv
    if program[0] != "-m" and program[0].startswith("-"):
        # python -B, -W, -c CODE (the resource trackers multiprocessing and loky start: the
        # standard library only): the server runs a script or -m MODULE, with -u at most.
        fresh(argv, "python options the server does not take")
    if program[:2] == ["-m", "submitit.local._local"]:
        # submitit's local controller names its jobs' folders after its own pid, which its
        # parent knows as this process's (submitit/local/local.py): it must be this process.
        fresh(argv, "submitit's controller is known by its pid")
    if not path:
        fresh(argv, "OCTCONV_EXP_TEST_FORKSERVER_SOCKET is not set")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as exc:
        fresh(argv, f"the server's socket: {exc}")
    request = {"argv": program, "cwd": os.getcwd(),
               "env": dict(os.environ), "unbuffered": unbuffered, "fds": extra}
    data = (json.dumps(request) + "\n").encode()
    conn.sendmsg([data[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [0, 1, 2] + extra))])
    conn.sendall(data[4096:])
    reader = conn.makefile("rb")
    first = json.loads(reader.readline() or b'{"refused": "the server ended"}')
    if "forked" not in first:
        conn.close()
        fresh(argv, first.get("refused"))
    pid = first["forked"]
    for fd in extra:  # the program holds them now: a pipe's end closes when the program ends
        os.close(fd)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    line = reader.readline()  # recv retries after a forwarded signal (PEP 475)
    if not line:
        os._exit(70)
    code = json.loads(line)["returncode"]
    if code < 0:  # killed by a signal: so is this process
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # no handler can be set for those
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        os._exit(128 - code)  # a signal that does not end a process: the shell's convention
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main(sys.argv[1:])
