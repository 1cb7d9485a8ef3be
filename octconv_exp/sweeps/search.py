"""The Optuna search's trials: which overrides make a trial, which trials are the same, and
Optuna's log format. The objectives themselves: :mod:`octconv_exp.records.objectives`."""
import logging
import sys

#: Overrides that do not change what a trial computes: trials that differ only in them train
#: the same model.
NOT_A_TRIAL_SETTING = ("trainer.progress_bar", "threads", "resume")


def trial_key(overrides):
    """What a trial trains, as a comparable value: its overrides (``key=value``), in any
    order, without Hydra's own and those of :data:`NOT_A_TRIAL_SETTING`."""
    kept = []
    for text in overrides:
        key = str(text).split("=", 1)[0].lstrip("+~")
        if key in NOT_A_TRIAL_SETTING or key.startswith(("hydra.", "hydra/")):
            continue
        kept.append(str(text))
    return tuple(sorted(kept))


def trial_overrides(params, fixed):
    """A stored trial's overrides as the Optuna sweeper launched it: its sampled ``params``
    and the fixed overrides it keeps as user attributes, each ``name=value``."""
    return [f"{name}={value}" for name, value in dict(fixed, **params).items()]


def unique_solutions(solutions):
    """The Pareto solutions of ``optimization_results.yaml`` (``{params, values}``), each set
    of parameters once (a study may hold a repeat of a trial, told the same values)."""
    seen, kept = set(), []
    for solution in solutions:
        key = tuple(sorted((str(k), str(v)) for k, v in dict(solution.get("params") or {}).items()))
        if key not in seen:
            seen.add(key)
            kept.append(solution)
    return kept


#: Optuna's own line format, without its colours.
OPTUNA_PLAIN_FORMAT = "[%(levelname)1.1s %(asctime)s] %(message)s"


def plain_optuna_logs(stream=None):
    """Optuna colours its log lines (colorlog) whatever the stream is; off a terminal (a file,
    a pipe, a cluster's job log) the escape codes are noise, so there its handler is swapped
    for a plain one writing the same lines to the same stream (stderr)."""
    import optuna  # optional: only a search (search=optuna) needs optuna

    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return
    optuna.logging.disable_default_handler()
    logger = logging.getLogger("optuna")
    if any(getattr(h, "octconv_exp_plain", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(OPTUNA_PLAIN_FORMAT))
    handler.octconv_exp_plain = True
    logger.addHandler(handler)
