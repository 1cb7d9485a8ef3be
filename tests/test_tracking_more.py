"""MLflow and Optuna, read back through their own APIs: a failed run's MLflow status and tags,
a sweep's report run and its artifacts, and an Optuna search asking two trials at once
(``hydra.sweeper.n_jobs=2`` on the joblib launcher)."""
import csv
import json
import os

import mlflow  # requirements.txt installs mlflow-skinny
import pytest

from conftest import SYNTHETIC_96, compose_config, optuna_study, run_cli

def client_for(tmp_path):
    return mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")


def runs_in(client, experiment):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id])


def test_a_failed_run_is_failed_in_mlflow_with_what_it_trained_and_where(tmp_path, monkeypatch):
    """A run that raises in its second epoch: its MLflow run ends FAILED (not RUNNING, not
    FINISHED), keeps the first epoch's metrics, and is tagged with the model, the dataset and
    the run dir."""
    from octconv_exp.training import runner

    real = runner.train_epoch

    def fails_in_epoch_2(step, loader, epoch, *args, **kwargs):
        if epoch == 2:
            raise RuntimeError("a failure inside epoch 2")
        return real(step, loader, epoch, *args, **kwargs)

    monkeypatch.setattr(runner, "train_epoch", fails_in_epoch_2)
    run_dir = tmp_path / "run"
    cfg = compose_config(*SYNTHETIC_96, "trainer.epochs=3", "model=resnet_cifar", "model.depth=8",
                         "logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
                         "logger.mlflow.experiment_name=failures")
    with pytest.raises(RuntimeError, match="inside epoch 2"):
        runner.run_experiment(cfg, str(run_dir))
    client = client_for(tmp_path)
    [run] = runs_in(client, "failures")
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["model"] == "resnet_cifar-8"
    assert tags["dataset"] == "synthetic"
    assert tags["run_dir"] == os.path.abspath(run_dir)
    assert (tags["conv"], tags["device"]) == ("vanilla", "cpu")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
    with open(run_dir / "mlflow_run.json") as f:
        assert json.load(f)["run_id"] == run.info.run_id  # a resume would continue this run


@pytest.mark.slow
def test_a_search_of_two_trials_at_once_stores_each_in_optuna_and_mlflow(tmp_path):
    """Two trials at once on the joblib launcher: the study holds two COMPLETE trials numbered
    0 and 1, each told its own run's objectives and trained in its own dir; MLflow holds
    one FINISHED run per trial tagged with that dir, and the sweep report's run, whose
    summary.csv artifact holds the trials' test accuracies."""
    sweep = tmp_path / "search"
    result = run_cli("-m", "experiment=alpha_search", *SYNTHETIC_96, "trainer.epochs=1",
                     "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", "logger=mlflow",
                     f"logger.mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
                     f"hydra.sweep.dir={sweep}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]

    study = optuna_study(sweep)
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(2)]
    assert sorted(d for d in os.listdir(sweep) if d.startswith("trial=")) == [
        f"trial={n}" for n in range(2)]
    metrics = {}
    for t in trials:
        with open(sweep / f"trial={t.number}" / "metrics.json") as f:
            m = json.load(f)
        metrics[t.number] = m
        if "octconv_exp:same_as" in t.system_attrs:
            continue  # asked twice: told the earlier trial's values, trained once
        assert m["status"] == "completed"
        assert t.values == [m["val_accuracy"], m["flops_per_image"]]
        assert (m["alpha"], m["expansion"]) == (t.params["alpha"], t.params["expansion"])

    client = client_for(tmp_path)
    runs = runs_in(client, "octconv-exp")
    jobs = [r for r in runs if r.data.tags.get("kind") != "sweep report"]
    report = [r for r in runs if r.data.tags.get("kind") == "sweep report"]
    trained = {os.path.abspath(sweep / f"trial={t.number}") for t in trials
               if "octconv_exp:same_as" not in t.system_attrs}
    assert sorted(r.data.tags["run_dir"] for r in jobs) == sorted(trained)
    assert {r.info.status for r in jobs} == {"FINISHED"}
    assert {r.data.tags["sweep_dir"] for r in runs} == {os.path.abspath(sweep)}
    for r in jobs:
        number = int(os.path.basename(r.data.tags["run_dir"])[len("trial="):])
        assert r.data.metrics["test_accuracy"] == pytest.approx(metrics[number]["test_accuracy"])
        assert r.data.params["alpha"] == str(metrics[number]["alpha"])

    assert len(report) == 1 and report[0].info.status == "FINISHED"
    local = client.download_artifacts(report[0].info.run_id, "summary.csv", str(tmp_path))
    with open(local) as f:
        rows = list(csv.DictReader(f))
    with open(sweep / "summary.csv") as f:
        assert rows == list(csv.DictReader(f))  # the artifact is the sweep dir's report
    assert len(rows) == len(trained)
    accuracy = next(k for k in rows[0] if "test_accuracy" in k)
    assert sorted(float(r[accuracy]) for r in rows) == pytest.approx(sorted(
        metrics[int(os.path.basename(d)[len("trial="):])]["test_accuracy"] for d in trained))
