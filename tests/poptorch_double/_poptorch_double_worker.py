"""The process of the double's Async worker (not part of PopTorch): a module of its own that
imports nothing heavy, so a forkserver child starts at once.

It models what the real worker process does with signals and commands, not its data (the
double computes the data in the host, see poptorch/_dataloader.py): PopTorch 3.4
python/_dataloader.py:258-278 runs the worker's loop inside ``try: ... except
KeyboardInterrupt: pass``, so a SIGINT (a terminal's Ctrl-C reaches the whole process group)
ends it with exit code 0; SIGTERM, left at its default, kills it (exit code -15); a Shutdown
command ends its loop (404-417)."""


def worker_main(replies, commands):
    """``replies`` answers each command: the double's host waits for it, as the real host
    waits for the data only the worker produces, so a worker that has exited is seen then."""
    try:
        replies.send("ready")  # _mainLoopNoInterrupt sends its buffers first (349-387)
        while True:
            command = commands.recv()
            if command == "Shutdown":
                return
            replies.send(command)
    except KeyboardInterrupt:
        pass  # _dataloader.py:271-278: exit code 0
    except (EOFError, BrokenPipeError):
        pass  # the host is gone
