"""The command line around run.py: errors a user causes end in one line and a non-zero exit.

Two places can reject a command line:
- composition (an unknown group option, an unknown key, a value of the wrong type): Hydra
  would print several lines; :func:`preflight` composes the config first (every value of every
  sweep) and reports the first problem in one line;
- validation (ranges, cross-key rules, missing data, devices): :func:`run_task` catches
  :class:`~octconv_exp.errors.UserError`, records it in the run's ``metrics.json`` and exits.
"""
import itertools
import logging
import os
import sys

from .errors import USER_ERROR_EXIT, UserError

log = logging.getLogger("octconv_exp")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
CONFIG_NAME = "config"
MAX_PREFLIGHT_COMBINATIONS = 256


def fail(message, code=USER_ERROR_EXIT):
    """Print one line to stderr and exit with the user-error status (or ``code``)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def one_line(text):
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def describe_composition_error(exc):
    """One line for a Hydra/OmegaConf composition error: the key, then what is wrong."""
    from omegaconf.errors import OmegaConfBaseException

    cause = exc if isinstance(exc, OmegaConfBaseException) else exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        message = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0].strip()
        if "not in" in message:
            message += f" (a new key needs a leading +, e.g. +{cause.full_key}=VALUE)"
        return f"{cause.full_key}: {message}"
    return one_line(str(exc).split("Config search path")[0])


def group_options(config_dir, group):
    path = os.path.join(config_dir, group)
    if not os.path.isdir(path):
        return None
    return sorted(f[:-5] for f in os.listdir(path) if f.endswith(".yaml"))


def _split_args(argv):
    """Hydra's own argument parser: (flags namespace, overrides)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    return args, list(args.overrides or [])


def _override_combinations(overrides):
    """Override lists covering every value of every sweep (the product when small)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for ov, text in zip(parsed, overrides):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            values = [f"{key}={v}" for v in ov.sweep_string_iterator()]
            choices.append(values or [text])
        else:
            choices.append([text])
    total = 1
    for c in choices:
        total *= len(c)
    if total <= MAX_PREFLIGHT_COMBINATIONS:
        return [list(combo) for combo in itertools.product(*choices)]
    combos = []  # too many: vary one sweep at a time
    base = [c[0] for c in choices]
    for i, c in enumerate(choices):
        for value in c:
            combo = list(base)
            combo[i] = value
            combos.append(combo)
    return combos


def _check_group_choices(overrides, config_dir):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if ov.package is not None or ov.is_delete() or key.startswith("hydra"):
            continue
        options = group_options(config_dir, key)
        if options is None:
            continue
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
        for value in values:
            if not isinstance(value, str) or value not in options:
                fail(f"{key}={value}: not an option of config group '{key}'; "
                     f"choose one of: {', '.join(options)}")


def check_output_dir(cfg, multirun):
    """The run (or sweep) dir must be creatable: its nearest existing ancestor a writable
    directory. Hydra would otherwise fail with a traceback before the run starts."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    from omegaconf import OmegaConf

    target = os.path.abspath(str(OmegaConf.select(cfg, key)))
    ancestor = target
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is not a directory" if not os.path.isdir(ancestor) else "is not writable"
        fail(f"{key}={target}: cannot create the output dir ({ancestor} {what}); choose "
             f"another with {key}=PATH")


def preflight(argv):
    """Compose (and validate) what argv asks for before Hydra starts any job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import validate

    try:
        args, overrides = _split_args(argv)
    except SystemExit:
        return  # argparse already said what is wrong
    if args.help or args.hydra_help or args.info or args.shell_completion or args.run:
        return
    config_dir = os.path.abspath(args.config_dir) if args.config_dir else CONFIG_DIR
    config_name = args.config_name or CONFIG_NAME
    try:
        combos = _override_combinations(overrides)
    except HydraException as exc:
        fail(one_line(exc))
    _check_group_choices(overrides, config_dir)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir):
            for combo in combos:
                try:
                    cfg = compose(config_name=config_name, overrides=combo)
                except (HydraException, OmegaConfBaseException) as exc:
                    fail(describe_composition_error(exc))
                if args.cfg is None:
                    validate(cfg)
            if args.cfg is None:
                check_output_dir(compose(config_name=config_name, overrides=combos[0],
                                         return_hydra_config=True), args.multirun)
    except UserError as exc:
        fail(str(exc))
    finally:
        GlobalHydra.instance().clear()


def log_to_files(level, message):
    """Record a message in the run's log file only (the console gets the one error line)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def is_multirun():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def launcher_threads(cfg):
    """torch threads per job: the config's ``threads``, else the job's share of the cores
    under a parallel launcher (joblib: cores / n_jobs; submitit: its cpus_per_task)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("threads") is not None:
        return int(cfg.threads)
    try:
        launcher = HydraConfig.get().launcher
    except ValueError:
        return None
    target = str(launcher.get("_target_", ""))
    cores = os.cpu_count() or 1
    if target.endswith("JoblibLauncher"):
        n_jobs = launcher.get("n_jobs", -1)
        n_jobs = cores if n_jobs is None or n_jobs < 1 else n_jobs
        return max(1, cores // min(n_jobs, cores))
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None


def run_task(cfg):
    """The body of run.py's task function: returns the test accuracy.

    A single run ends a failed run with one line and exit status 2. In a multirun, a failed
    or diverged job is recorded in its metrics.json and the sweep goes on; the sweep report
    (octconv_exp.report.SweepReport) then exits non-zero, naming the failed jobs.
    """
    from hydra.core.hydra_config import HydraConfig

    from .errors import Diverged, RunInterrupted
    from .runner import Run, run_experiment

    output_dir = HydraConfig.get().runtime.output_dir
    run = Run(cfg, output_dir)
    multirun = is_multirun()
    try:
        metrics = run_experiment(cfg, output_dir, run=run, threads=launcher_threads(cfg),
                                 fresh_if_no_checkpoint=multirun)
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised or reported below
        user_error = isinstance(exc, UserError)
        if not user_error and not multirun:
            raise  # a programming error in a single run keeps its traceback
        if isinstance(exc, RunInterrupted):
            fail(str(exc), exc.exit_code)  # its checkpoint and metrics are written; stop the sweep too
        run.status = "diverged" if isinstance(exc, Diverged) else "failed"
        run.error = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
        try:
            run.write_metrics()
        except OSError:
            pass  # the output dir itself may be what is wrong
        if user_error:
            log_to_files(logging.ERROR, run.error)
        else:
            log.exception("job failed")  # the traceback goes to this job's log
        if multirun:
            sweep_dir = str(HydraConfig.get().sweep.dir)
            sys.stderr.write(f"error: {os.path.relpath(output_dir, sweep_dir)}: {run.error}\n")
            return None
        fail(run.error)
    log.info("Outputs in %s", output_dir)
    return metrics.get("test_accuracy")
