"""What a search optimises: the objectives of ``search.objectives``, their directions, their
values in a run's metrics, and the Pareto front of a set of runs.

``accuracy`` is the validation accuracy when the run has a validation split (what a search
should select on), else the test accuracy. The others are metrics.json's own fields.
"""
import math

#: Each objective a search (and the report's Pareto front) may use, and its direction.
OBJECTIVES = {
    "accuracy": "maximize",
    "val_accuracy": "maximize",
    "test_accuracy": "maximize",
    "flops_per_image": "minimize",
    "params": "minimize",
    "train_images_per_second": "maximize",
}


def directions(objectives):
    """Optuna's direction of each objective (``hydra.sweeper.direction`` in the preset)."""
    return [OBJECTIVES[str(name)] for name in objectives]


def value(metrics, name):
    """One objective's value in a run's metrics (None when the run has none)."""
    if name == "accuracy":
        found = metrics.get("val_accuracy")
        if found is None:
            found = metrics.get("test_accuracy")
    else:
        found = metrics.get(name)
    if isinstance(found, bool) or not isinstance(found, (int, float)) or not math.isfinite(found):
        return None
    return float(found)


def objective_values(metrics, objectives):
    """The values a sweeper is told: a float for one objective, a tuple for several; None
    for a run that did not complete or lacks one (the sweeper records a failed trial)."""
    if not metrics or metrics.get("status") != "completed":
        return None
    values = [value(metrics, str(name)) for name in objectives]
    if any(v is None for v in values):
        return None
    return values[0] if len(values) == 1 else tuple(values)


def dominates(a, b, signs):
    """Is point ``a`` at least as good as ``b`` in every objective and better in one?
    ``signs``: +1 to maximise, -1 to minimise."""
    better = False
    for x, y, s in zip(a, b, signs):
        if s * x < s * y:
            return False
        if s * x > s * y:
            better = True
    return better


def pareto_front(points, objective_directions):
    """Indices of the non-dominated points (lists of numbers, one per objective)."""
    signs = [1 if d == "maximize" else -1 for d in objective_directions]
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, signs) for j, q in enumerate(points) if j != i)]


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
    import logging
    import sys

    import optuna

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
