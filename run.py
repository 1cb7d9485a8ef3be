"""octconv-exp entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

Composes the config (conf/), hands it to the runner and returns the test accuracy, so that
optimising sweepers can use it.
"""
import signal
import sys


def _stopped_outside_a_run(signum, frame):
    """SIGINT/SIGTERM while no run is going (start-up, between sweep jobs, while joblib's
    workers run the jobs, the sweep report): one line, not a KeyboardInterrupt traceback.
    A run installs its own handler (octconv_exp.stopping.StopRequest) from its start-up to
    its last output. In a sweep the first signal lets the running jobs checkpoint (each gets
    the terminal's signal itself) and records the jobs not started yet; a second ends it."""
    from octconv_exp.stopping import SWEEP_STOP, note_sweep_stop

    name = signal.Signals(signum).name
    if _MULTIRUN and SWEEP_STOP["signal"] is None:
        note_sweep_stop(signum)
        sys.stderr.write(f"{name} received: the running jobs stop at a checkpoint, the jobs "
                         "not started are recorded as interrupted (again to stop at once)\n")
        return
    sys.stderr.write(f"error: interrupted by {name} outside a run; no run's outputs were "
                     "lost\n")
    sys.exit(128 + signum)


_MULTIRUN = any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN"
                for a in sys.argv[1:])


if __name__ == "__main__":  # not in a launcher's worker that imports this module
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stopped_outside_a_run)

import hydra  # noqa: E402

from octconv_exp import config  # noqa: F401,E402  (registers the schema in the ConfigStore)
from octconv_exp.cli import preflight, run_task  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    return run_task(cfg)


if __name__ == "__main__":
    from octconv_exp.cli import fail
    from octconv_exp.distributed import agree_on_launch
    from octconv_exp.errors import UserError

    try:  # torchrun: the ranks agree on one run dir before Hydra names it
        sys.argv[1:] = agree_on_launch(sys.argv[1:])
    except UserError as exc:
        fail(str(exc))
    sys.argv[1:] = preflight(sys.argv[1:])
    try:
        main()
    except SystemExit as exc:
        from octconv_exp.stopping import SWEEP_STOP

        if SWEEP_STOP["signal"] is not None and exc.code not in (0, None):
            sys.exit(128 + SWEEP_STOP["signal"])  # an interrupted sweep ends as interrupted
        raise
