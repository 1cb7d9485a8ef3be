"""What a search and a sweep report optimise: the objectives of ``search.objectives``, their
directions, their values in a run's metrics.json, and the Pareto front of a set of runs.

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
