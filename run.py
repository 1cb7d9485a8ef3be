"""octconv-exp entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

Composes the config (conf/), hands it to the runner and returns the test accuracy, so that
optimising sweepers can use it.
"""
import signal
import sys


def _this_process():
    """octconv_exp.training.stopping.PROCESS, the process's state this handler reads, once imported
    (None while the first import of it is under way: a signal then stops the start-up)."""
    return getattr(sys.modules.get("octconv_exp.training.stopping"), "PROCESS", None)


def _stopped_outside_a_run(signum, frame):
    """SIGINT/SIGTERM while no run is going (start-up, between sweep jobs, while joblib's
    workers run the jobs, the sweep report): one line, not a KeyboardInterrupt traceback.
    A run installs its own handler (octconv_exp.training.stopping.StopRequest) from its start-up to
    its last output. In a sweep the first signal lets the running jobs checkpoint (each gets
    the terminal's signal itself) and records the jobs not started yet; a second ends it.
    Once the process has chosen its exit (``PROCESS.exit_with``: after its one-line error, or
    a data-parallel rank whose stop rank 0 reports), a signal only ends it, quietly."""
    process = _this_process()
    if process is not None and process.exit_code is not None:
        # The process already wrote its outputs and said what it had to, and is exiting (a
        # failed rank's peers get torchrun's SIGTERM here): end it now with that status,
        # without a second line, and without raising into whatever exit code it is in.
        _end_now(process.exit_code)
    name = signal.Signals(signum).name
    if _MULTIRUN:
        from octconv_exp.training.stopping import PROCESS

        if PROCESS.sweep_stop.signal is None:
            PROCESS.sweep_stop.note(signum)
            sys.stderr.write(f"{name} received: the running jobs stop at a checkpoint, the jobs "
                             "not started are recorded as interrupted (again to stop at once)\n")
            return
    sys.stderr.write(f"error: interrupted by {name} outside a run; no run's outputs were "
                     "lost\n")
    if _MULTIRUN:
        sys.exit(128 + signum)  # a second signal to a sweep
    # Ended here, not by raising SystemExit where the signal landed: an import half done, code
    # that catches BaseException or a C routine that clears errors swallowed it (the run then
    # trained and exited 0) or turned it into another error's traceback. Outside a run nothing
    # of a run is being written (a run holds its own handler, StopRequest).
    _end_now(128 + signum)


def _end_now(code):
    import os

    # Not imported here: the signal may have interrupted logging's own import.
    logging = sys.modules.get("logging")
    try:
        loggers = [logging.getLogger(), logging.getLogger("octconv_exp")] if logging else []
    except Exception:  # noqa: BLE001 - logging's own import half done: no handler to flush yet
        loggers = []
    for handler in [h for logger in loggers for h in logger.handlers]:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - a handler being closed: nothing left to flush
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


_MULTIRUN = any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN"
                for a in sys.argv[1:])


if __name__ == "__main__":  # not in a launcher's worker that imports this module
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stopped_outside_a_run)

# Before torch is loaded: its OpenMP runtime reads OMP_WAIT_POLICY once, when it loads.
from octconv_exp.backends.threads import apply_wait_policy  # noqa: E402

apply_wait_policy()

import hydra  # noqa: E402

from octconv_exp.training.stopping import PROCESS  # noqa: E402

from octconv_exp.config import schema as config  # noqa: F401,E402  (registers the schema in the ConfigStore)
from octconv_exp.cli.outcome import run_task  # noqa: E402
from octconv_exp.cli.preflight import preflight  # noqa: E402


def task_function(recorded_overrides=()):
    """run.py's task function, given what preflight found: the overrides it took from the
    run's record (a closure, so that it travels with the function to a launcher's worker)."""

    def main(cfg):
        return run_task(cfg, recorded_overrides)

    return hydra.main(version_base="1.3", config_path="conf", config_name="config")(main)


#: The task function of a plain command line (``import run; run.main(cfg)`` works too).
main = task_function()


if __name__ == "__main__":
    from octconv_exp.cli.preflight import fail
    from octconv_exp.backends.distributed import agree_on_launch
    from octconv_exp.config.presets import compositions_reused
    from octconv_exp.errors import UserError

    try:  # torchrun: the ranks agree on one run dir before Hydra names it
        sys.argv[1:] = agree_on_launch(sys.argv[1:])
    except UserError as exc:
        fail(str(exc))
    stopped = PROCESS.sweep_stop
    with compositions_reused():  # Hydra's main gets a copy of what preflight composed
        launch = preflight(sys.argv[1:])
        sys.argv[1:] = launch.argv
        try:
            with launch.hydra_mode_known():  # and composes nothing only to read hydra.mode
                task_function(launch.recorded_overrides)()
        except SystemExit as exc:
            if stopped.signal is not None and exc.code not in (0, None):
                sys.exit(128 + stopped.signal)  # an interrupted sweep ends as interrupted
            raise
    if _MULTIRUN and stopped.signal is not None:
        # Stopped, though every job it started completed (the signal came between jobs, or
        # to a joblib sweep's own process): the jobs it did not start make it interrupted.
        sys.exit(128 + stopped.signal)
