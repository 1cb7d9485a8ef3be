"""``python -S forkclient.py [-u] SCRIPT ARGS...``: run ``python [-u] SCRIPT ARGS`` through the
tests' fork server (forkserver.py), for programs another program starts: torchrun's ranks
(``torchrun --no-python ... python -S forkclient.py -u run.py ...``, what torchrun runs
for ``torchrun ... run.py ...`` with ``-u`` added).

This process stands in for the program: it passes its standard streams, working directory,
environment and arguments to the server at ``$OCTCONV_EXP_TEST_FORKSERVER_SOCKET``; the
server forks the program from its warm state (or refuses, and then this process becomes
``python [-u] SCRIPT ARGS`` itself, with exec). Signals sent to this process (torchrun's
SIGTERM to its ranks) go to the program; this process ends as the program ended: its exit
status, or killed by the same signal. Killed itself (SIGKILL), its connection closes and the
server kills the program. Standard library only (``-S``: no site-packages, a fast start).
"""
import array
import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)


def fresh(argv):
    """Become ``python ARGV``: the program without the server."""
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable] + argv)


def main(argv):
    unbuffered = argv[:1] == ["-u"]
    path = os.environ.get("OCTCONV_EXP_TEST_FORKSERVER_SOCKET")
    if not path:
        fresh(argv)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        fresh(argv)
    request = {"argv": argv[1:] if unbuffered else argv, "cwd": os.getcwd(),
               "env": dict(os.environ), "unbuffered": unbuffered}
    data = (json.dumps(request) + "\n").encode()
    conn.sendmsg([data[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [0, 1, 2]))])
    conn.sendall(data[4096:])
    reader = conn.makefile("rb")
    first = json.loads(reader.readline() or b'{"refused": "the server ended"}')
    if "forked" not in first:
        conn.close()
        fresh(argv)
    pid = first["forked"]

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
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        os._exit(128 - code)  # a signal that does not end a process: the shell's convention
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main(sys.argv[1:])
