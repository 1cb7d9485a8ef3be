"""SIGINT/SIGTERM: what a run, a sweep job and a sweep do with them.

A run (:class:`StopRequest`, held by run.py from start-up to the last output written) stops
after the current training step and writes a checkpoint, or stops at once where there is
nothing to save; a sweep records its running jobs as interrupted and starts no more
(:data:`SWEEP_STOP`). Light on purpose: run.py's own handler imports it before torch.
"""
import logging
import signal
import threading

log = logging.getLogger("octconv_exp")


class StopNow(BaseException):
    """A signal that stops the run where it is: at start-up, during evaluation, or a second
    signal during training. Nothing is lost: checkpoints and outputs are written atomically,
    so the last complete ones stay; :func:`stopped_now` words the line and the status.
    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way
    (Hydra's instantiate wraps those) turns it into another error."""

    def __init__(self, signum, phase):
        self.signum, self.phase = signum, phase
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} {phase}")


#: The first SIGINT/SIGTERM this process received, in or between runs: a parallel launcher's
#: worker (joblib) starts no further sweep job after one.
SWEEP_STOP = {"signal": None}


def note_sweep_stop(signum, frame=None):
    """Between the jobs of a parallel launcher's worker: remember the signal, do nothing else
    (the jobs still to come are then recorded as interrupted instead of run)."""
    if SWEEP_STOP["signal"] is None:
        SWEEP_STOP["signal"] = signum


class StopRequest:
    """SIGINT/SIGTERM handling for a whole run, from start-up to the last output written.

    - While training (``polling()``): the first signal asks the loop to stop after the
      current step (checkpoint, metrics, exit); a second one stops at once (:class:`StopNow`).
    - At start-up and during evaluation, where there is nothing to save, a signal stops at
      once (:class:`StopNow`).
    - After the final accuracy (``finishing()``), the run's outputs are written first and the
      signal is reported in one line; a second signal stops at once.
    """

    def __init__(self):
        self.signal = None
        self.phase = "at start-up"
        self.mode = "immediate"   # immediate | polled | finishing | closing
        self._previous = {}

    def __call__(self):
        return self.signal is not None

    def set_phase(self, mode, phase):
        self.mode, self.phase = mode, phase

    def _handle(self, signum, frame):
        first = self.signal is None
        name = signal.Signals(signum).name
        note_sweep_stop(signum)
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
        raise StopNow(signum, self.phase if first
                      else f"(a second signal) {self.phase}")

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
