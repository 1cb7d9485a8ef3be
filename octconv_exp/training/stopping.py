"""SIGINT/SIGTERM: what a run, a sweep job and a sweep do with them.

A run (:class:`StopRequest`, held by run.py from start-up to the last output written) stops
after the current training step and writes a checkpoint, or stops at once where there is
nothing to save; a sweep records its running jobs as interrupted and starts no more
(:class:`SweepStop`, held by the process's :data:`PROCESS`). Light on purpose: run.py's own
handler imports it before torch.
"""
import logging
import os
import signal
import sys
import threading

log = logging.getLogger("octconv_exp")


class StopNow(BaseException):
    """A signal that stops the run where it is: at start-up, during evaluation, or a second
    signal during training. Nothing is lost: checkpoints and outputs are written atomically,
    so the last complete ones stay; :meth:`runner.RunLifecycle.stopped_now` words the line
    and the status.
    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way
    (Hydra's instantiate wraps those) turns it into another error."""

    def __init__(self, signum, phase):
        self.signum, self.phase = signum, phase
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} {phase}")


#: In the sweep dir: the signal the sweep's own process received. A signal sent to that
#: process alone (kill PID, a scheduler's SIGTERM) does not reach a joblib launcher's worker
#: processes: they read it here, start no further job and stop the running one at a step.
STOP_MARKER = ".sweep_stop"


class SweepStop:
    """The first SIGINT/SIGTERM this process received, in or between runs: a sweep starts no
    further job after one (a parallel launcher's worker, joblib, neither), and the sweep
    ends as interrupted. ``dir``: the sweep dir of the sweep this process runs (set by the
    sweepers, :meth:`start`), where the signal is left for the workers."""

    def __init__(self):
        self.signal = None
        self.dir = None

    def note(self, signum, frame=None):
        """Remember the signal (and leave it in the sweep dir), do nothing else: the jobs still
        to come are then recorded as interrupted instead of run. Also a signal handler."""
        if self.signal is not None:
            return
        self.signal = signum
        if self.dir:
            try:
                with open(os.path.join(self.dir, STOP_MARKER), "w") as f:
                    f.write(f"{signum}\n")
            except OSError:  # the workers then see only the signals they get themselves
                pass

    def start(self, sweep_dir):
        """A sweeper starts (under the sweep dir's lock): a stop left by an earlier,
        interrupted sweep in this dir is no longer asked for."""
        self.dir = str(sweep_dir)
        try:
            os.unlink(os.path.join(str(sweep_dir), STOP_MARKER))
        except FileNotFoundError:
            pass
        if self.signal is not None:  # arrived while Hydra started the sweeper
            signum, self.signal = self.signal, None
            self.note(signum)


class ProcessState:
    """How this process as a whole stops and ends: the sweep stop it was asked for
    (:class:`SweepStop`) and, once it has said its last word, the exit status it chose
    (``exit_code``: a signal that arrives while it exits, e.g. torchrun's SIGTERM to the ranks
    left when one fails, then ends it with that status and no further line).

    One per process, :data:`PROCESS`, and nothing else in the package holds such state. Its
    owner is the process's entry point: run.py's signal handler reads it from before Hydra
    starts and run.py's main its sweep stop after Hydra returns; run.py hands its sweep stop
    to each run's :class:`StopRequest` (cli.outcome.run_task). The sweepers, which Hydra builds, and
    a joblib worker's jobs, which run in a process of their own (with its own), reach it
    here."""

    def __init__(self):
        self.sweep_stop = SweepStop()
        self.exit_code = None

    def exit_with(self, code):
        """End the process with ``code``, its last word said."""
        self.exit_code = code
        sys.exit(code)


PROCESS = ProcessState()


def marker_signal(sweep_dir):
    """The signal the sweep's own process left in ``sweep_dir`` (:data:`STOP_MARKER`), or None."""
    path = os.path.join(sweep_dir, STOP_MARKER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return int(f.read().strip() or signal.SIGINT)
    except (OSError, ValueError):
        return int(signal.SIGINT)


class StopRequest:
    """SIGINT/SIGTERM handling for a whole run, from start-up to the last output written.

    - While training (``polling()``): the first signal asks the loop to stop after the
      current step (checkpoint, metrics, exit); a second one stops at once (:class:`StopNow`).
    - At start-up and during evaluation, where there is nothing to save, a signal stops at
      once (:class:`StopNow`).
    - After the final accuracy (``finishing()``), the run's outputs are written first and the
      signal is reported in one line; a second signal stops at once.
    """

    def __init__(self, sweep_stop=None):
        """``sweep_stop``: the process's :class:`SweepStop`, told of every signal (default:
        :data:`PROCESS`'s)."""
        self.sweep_stop = PROCESS.sweep_stop if sweep_stop is None else sweep_stop
        self.signal = None
        self.phase = "at start-up"
        self.mode = "immediate"   # immediate | polled | finishing | closing
        self._previous = {}
        #: A joblib worker's job: the sweep's stop marker, polled with the stop request.
        self.sweep_dir = None
        self._from_marker = False
        #: The StopNow this request raised. It lands wherever the signal found the run: code
        #: that catches BaseException may swallow it, an import it interrupts may turn it into
        #: another error (``RuntimeError: Error calling __set_name__``, ``ImportError: cannot
        #: load module more than once``): the run is stopped all the same.
        self.raised = None

    def __call__(self):
        if self.signal is None and self.sweep_dir is not None:
            signum = marker_signal(self.sweep_dir)
            if signum is not None:
                log.warning("%s received by the sweep: stopping after the current step",
                            signal.Signals(signum).name)
                self.signal, self._from_marker = signum, True
        return self.signal is not None

    def adopt(self, signum):
        """Stop as another rank was asked to (data-parallel: every rank stops at the step any
        of them was asked to). This process's own first signal is still a first one: the
        launcher's SIGTERM once that rank has exited (torchrun stops the rest of the group)
        must not stop this one at once while it writes the checkpoint."""
        self.signal, self._from_marker = signum, True

    def set_phase(self, mode, phase):
        if self.raised is not None and mode in ("polled", "finishing"):
            # The stop was swallowed on the way: never train, nor report a finished run, after it.
            raise StopNow(self.raised.signum, self.raised.phase)
        self.mode, self.phase = mode, phase

    def _handle(self, signum, frame):
        # The sweep's marker may be read just before this process's own copy of the same
        # terminal signal arrives: that is still the first signal.
        first = self.signal is None or self._from_marker
        self._from_marker = False
        name = signal.Signals(signum).name
        self.sweep_stop.note(signum)
        if first:
            self.signal = signum
        if first and self.mode == "polled":
            log.warning("%s received: stopping after the current step (again to stop at once)",
                        name)
            return
        if self.mode == "closing":
            return  # the run's last record is being written: a few milliseconds
        if first and self.mode == "finishing":
            log.warning("%s received after the run finished: writing its outputs first (again "
                        "to stop at once)", name)
            return
        self.raised = StopNow(signum, self.phase if first
                              else f"(a second signal) {self.phase}")
        raise self.raised

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
