"""Multi-objective search (search=optuna, experiment=alpha_search) and the Pareto front of a
sweep's report. The study is read back through Optuna's own API."""
import csv
import io
import os

import pytest
import optuna  # requirements.txt installs it; the plugin pins <3

from conftest import (SYNTHETIC_160_ONE_EPOCH, compose_config, only_error_line, optuna_study,
                      run_cli)
from octconv_exp.records.objectives import directions, objective_values, pareto_front


def test_pareto_front_keeps_the_non_dominated_points():
    points = [[90, 5.0], [85, 2.0], [80, 2.0], [95, 9.0], [90, 6.0], [85, 2.0]]
    dirs = directions(["accuracy", "flops_per_image"])
    assert dirs == ["maximize", "minimize"]
    # [80, 2] and [90, 6] are dominated; the two equal [85, 2] do not dominate each other.
    assert pareto_front(points, dirs) == [0, 1, 3, 5]
    assert pareto_front([[1.0], [3.0], [2.0]], ["maximize"]) == [1]
    assert pareto_front([[1.0, 1.0], [2.0, 2.0]], ["minimize", "maximize"]) == [0, 1]


def test_a_trial_is_told_its_objectives_or_nothing():
    m = {"status": "completed", "val_accuracy": 71.0, "test_accuracy": 70.0,
         "flops_per_image": 2.0e6, "params": 12000, "train_images_per_second": 900.0}
    assert objective_values(m, ["accuracy", "flops_per_image"]) == (71.0, 2.0e6)
    assert objective_values(dict(m, val_accuracy=None), ["accuracy"]) == 70.0  # no split
    assert objective_values(dict(m, status="diverged"), ["accuracy"]) is None
    assert objective_values(dict(m, params=float("nan")), ["params"]) is None
    assert objective_values(None, ["accuracy"]) is None


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_optuna_logs_are_plain_off_a_terminal_and_left_coloured_on_one():
    import logging

    from octconv_exp.sweeps.search import plain_optuna_logs

    logger = logging.getLogger("optuna")
    before = list(logger.handlers)
    terminal = _Terminal()
    plain_optuna_logs(terminal)
    assert logger.handlers == before and terminal.getvalue() == ""
    piped = io.StringIO()
    try:
        plain_optuna_logs(piped)
        plain_optuna_logs(piped)  # once only
        optuna.logging.get_logger("optuna.storages").info("A new study created")
        lines = piped.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("[I ")
        assert lines[0].endswith("] A new study created") and "\x1b" not in lines[0]
    finally:
        for handler in logger.handlers:
            if getattr(handler, "octconv_exp_plain", False):
                logger.removeHandler(handler)
        optuna.logging.enable_default_handler()


def test_a_trial_is_known_by_what_it_trains():
    from octconv_exp.sweeps.search import trial_key, trial_overrides, unique_solutions

    launched = ["alpha=0.25", "expansion=2", "dataset=synthetic", "trainer.progress_bar=False"]
    same = ["dataset=synthetic", "expansion=2", "alpha=0.25", "hydra.sweep.subdir='trial=3'"]
    assert trial_key(launched) == trial_key(same)
    assert trial_key(launched) != trial_key(["dataset=synthetic", "expansion=2", "alpha=0.5"])
    assert trial_key(same + ["seed=1"]) != trial_key(same)  # another seed: another run
    # A stored trial, as the sweeper launched it: sampled parameters and fixed overrides.
    stored = trial_overrides({"alpha": 0.25, "expansion": 2}, {"dataset": "synthetic"})
    assert trial_key(stored) == trial_key(same)
    front = [{"params": {"alpha": 0.25}, "values": [9.0, 1.0]},
             {"params": {"alpha": 0.25}, "values": [9.0, 1.0]},
             {"params": {"alpha": 0.5}, "values": [8.0, 0.5]}]
    assert unique_solutions(front) == [front[0], front[2]]


@pytest.mark.slow
def test_search_objectives_are_checked_in_one_line():
    result = run_cli("dataset=synthetic", "search.objectives=[accuracy,speed]")
    assert result.returncode == 2
    assert only_error_line(result.stderr).startswith(
        "error: search.objectives=['accuracy', 'speed']: speed is not an objective")


def test_the_search_preset_composes_nsga2_on_sqlite_with_one_direction_per_objective():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import REPO

    compose_config()  # the schema
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(REPO, "conf")):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["experiment=alpha_search",
                                 "search.objectives=[accuracy,flops_per_image,params]",
                                 "hydra.sweep.dir=/tmp/s"])
    GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("optuna_search.OptunaSearchSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert list(sweeper.direction) == ["maximize", "minimize", "minimize"]
    assert sweeper.storage == "sqlite:////tmp/s/optuna.db"
    assert cfg.dataset.val_size == 0.1  # selects on validation accuracy
    # The model is searched, not the conv implementation (octave and multi-octave compute
    # the same function: a search over both trained each model twice).
    assert cfg.conv.mode == "multi-octave" and sorted(sweeper.params) == ["alpha", "expansion"]


@pytest.mark.slow
@pytest.mark.sdk
def test_a_search_stores_its_trials_continues_and_reports_the_front(tmp_path):
    sweep = str(tmp_path / "search")
    args = ["-m", "experiment=alpha_search", *SYNTHETIC_160_ONE_EPOCH, f"hydra.sweep.dir={sweep}"]
    result = run_cli(*args, "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    # stderr is a pipe here, not a terminal: Optuna's lines come without colour codes.
    assert "A new study created in RDB with name: alpha_search" in result.stderr
    assert "\x1b[" not in result.stderr + result.stdout
    s = optuna_study(sweep)
    assert [t.state.name for t in s.trials] == ["COMPLETE"] * 2
    assert sorted(d for d in os.listdir(sweep) if d.startswith("trial=")) == ["trial=0", "trial=1"]
    # Each trial's values are its run's objectives: validation accuracy and FLOPs.
    import json

    for t in s.trials:
        with open(os.path.join(sweep, f"trial={t.number}", "metrics.json")) as f:
            m = json.load(f)
        assert t.values == [m["val_accuracy"], m["flops_per_image"]]
        assert (m["conv"], m["alpha"], m["expansion"]) == (
            "multi-octave", t.params["alpha"], t.params["expansion"])
    # The report: pareto.csv holds the front of the configurations, and the plots exist.
    with open(os.path.join(sweep, "pareto.csv")) as f:
        rows = list(csv.DictReader(f))
    points = [[float(r["accuracy"]), float(r["flops_per_image"])] for r in rows]
    assert rows and pareto_front(points, ["maximize", "minimize"]) == list(range(len(rows)))
    from PIL import Image

    for name in ("accuracy_vs_flops.png", "accuracy_vs_throughput.png"):
        with Image.open(os.path.join(sweep, name)) as img:
            assert img.format == "PNG" and min(img.size) > 100
            img.verify()

    # A sweep killed inside a trial leaves it RUNNING: it is no failure; the next run asks it
    # again (its number, its parameters, its dir) and tops the study up to n_trials.
    # (Parameters no finished trial has: those would be told that trial's values.)
    done = {(t.params["alpha"], t.params["expansion"]) for t in s.trials}
    alpha, expansion = next((a, e) for a in (0.125, 0.25, 0.375) for e in (1, 2)
                            if (a, e) not in done)
    s.enqueue_trial({"alpha": alpha, "expansion": expansion})
    stale = s.ask()
    stale.suggest_categorical("alpha", [0.125, 0.25, 0.375, 0.5, 0.625, 0.75])
    stale.suggest_categorical("expansion", [1, 2])
    result = run_cli(*args, "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna_study(sweep).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert trials[2].params == stale.params
    with open(os.path.join(sweep, "trial=2", "metrics.json")) as f:
        m = json.load(f)
    assert m["status"] == "completed" and (m["alpha"], m["expansion"]) == (alpha, expansion)
    assert trials[2].values == [m["val_accuracy"], m["flops_per_image"]]
    assert not os.path.exists(os.path.join(sweep, "trial=3"))
    # Run again as it is: the study is complete, nothing runs, the report is rewritten.
    result = run_cli(*args, "hydra.sweeper.n_trials=3")
    assert result.returncode == 0 and len(optuna_study(sweep).trials) == 3


@pytest.mark.slow
def test_failed_trials_are_failed_in_the_study_not_numbers(tmp_path):
    sweep = str(tmp_path / "search")
    result = run_cli("-m", "experiment=alpha_search", *SYNTHETIC_160_ONE_EPOCH,
                     "trainer.batch_size=1000", "hydra.sweeper.n_trials=2",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1  # the report names the failed runs
    assert "2 of 2 runs did not complete" in result.stderr
    assert [(t.state.name, t.values) for t in optuna_study(sweep).trials] == [("FAIL", None)] * 2


def trial_dirs(sweep):
    return sorted((d for d in os.listdir(sweep) if d.startswith("trial=")),
                  key=lambda d: int(d.split("=")[1]))


@pytest.mark.slow
def test_a_continued_search_never_trains_the_same_parameters_twice(tmp_path):
    """Three trials, then continued to five with trial 0's parameters queued (as a sampler
    may propose them): that trial is told trial 0's values, not trained; the continued
    sampler proposes anew; the report and the front list each configuration once."""
    import json

    import yaml

    sweep = str(tmp_path / "search")
    args = ["-m", "experiment=alpha_search", *SYNTHETIC_160_ONE_EPOCH, f"hydra.sweep.dir={sweep}"]
    result = run_cli(*args, "hydra.sweeper.n_trials=3")
    assert result.returncode == 0, result.stderr[-3000:]
    first = optuna_study(sweep).trials
    optuna_study(sweep).enqueue_trial(dict(first[0].params))
    result = run_cli(*args, "hydra.sweeper.n_trials=5")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna_study(sweep).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    repeat = trials[3]
    assert repeat.params == trials[0].params and repeat.values == trials[0].values
    assert repeat.system_attrs["octconv_exp:same_as"] == 0
    assert "Trial 3 has the overrides of trial 0: told its values" in result.stdout + result.stderr
    # Every trained trial has parameters of its own, and each run dir is its trial's.
    dirs = trial_dirs(sweep)
    assert "trial=3" not in dirs and len(dirs) == 4
    trained = {}
    for d in dirs:
        with open(os.path.join(sweep, d, "metrics.json")) as f:
            m = json.load(f)
        t = trials[int(d.split("=")[1])]
        assert (m["conv"], m["alpha"], m["expansion"]) == (
            "multi-octave", t.params["alpha"], t.params["expansion"])
        assert t.values == [m["val_accuracy"], m["flops_per_image"]]
        trained.setdefault((m["alpha"], m["expansion"]), []).append(d)
    assert all(len(v) == 1 for v in trained.values()), trained
    # The report: one row per configuration, one run and one seed each; the front once.
    with open(os.path.join(sweep, "summary_by_config.csv")) as f:
        groups = list(csv.DictReader(f))
    assert len(groups) == 4 and all((g["n"], g["seeds"]) == ("1", "0") for g in groups)
    with open(os.path.join(sweep, "pareto.csv")) as f:
        front = [(r["alpha"], r["expansion"]) for r in csv.DictReader(f)]
    assert front and len(front) == len(set(front))
    with open(os.path.join(sweep, "optimization_results.yaml")) as f:
        solutions = yaml.safe_load(f)["solutions"]
    params = [tuple(sorted(s["params"].items())) for s in solutions]
    assert params and len(params) == len(set(params))
