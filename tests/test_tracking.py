"""logger=mlflow: each job an MLflow run in a local SQLite store (read back through MLflow's
own API), loggers combined, an unreachable tracking server refused at start."""
import json
import os

import pytest
import mlflow  # requirements.txt installs mlflow-skinny

from conftest import SYNTHETIC_200_TWO_EPOCHS, compose_config, only_error_line, run_cli
from octconv_exp.records.loggers import flatten, selected


def runs_of(tmp_path, experiment="octconv-exp"):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    return mlflow.search_runs(experiment_names=[experiment])


def test_loggers_combine_and_old_configs_name_one():
    cfg = compose_config("logger=[csv,tensorboard,mlflow]")
    assert list(selected(cfg)) == ["csv", "tensorboard", "mlflow"]
    assert list(selected(compose_config())) == ["csv"]
    from omegaconf import OmegaConf

    old = OmegaConf.create({"logger": {"name": "tensorboard", "log_dir": "tb"}})
    assert list(selected(old)) == ["tensorboard"] and selected(old)["tensorboard"].log_dir == "tb"


def test_params_are_the_flattened_config():
    params = flatten({"a": 1, "b": {"c": [1, 2], "d": {"e": None}}, "f": "x" * 900, "g": {}})
    assert params == {"a": "1", "b.c": "[1, 2]", "b.d.e": "None", "f": "x" * 500, "g": "{}"}


@pytest.mark.slow
def test_an_unreachable_tracking_server_is_one_line_before_training(tmp_path):
    result = run_cli(*SYNTHETIC_200_TWO_EPOCHS, "logger=mlflow",
                     "logger.mlflow.tracking_uri=http://127.0.0.1:9",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=str(tmp_path))
    assert result.returncode == 2
    last = only_error_line(result.stderr)
    assert last.startswith("error: logger.mlflow.tracking_uri=http://127.0.0.1:9: the tracking "
                           "store does not answer"), result.stderr[-2000:]
    assert "Epoch 1" not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.sdk
def test_a_run_is_an_mlflow_run_and_a_resume_continues_it(tmp_path):
    run_dir = str(tmp_path / "run")
    result = run_cli(*SYNTHETIC_200_TWO_EPOCHS, "logger=[csv,tensorboard,mlflow]",
                     f"hydra.run.dir={run_dir}", "conv=octave", "alpha=0.25", cwd=str(tmp_path),
                     env={"OCTCONV_EXP_SIGNAL_AT": "step:30"})  # epoch 2 of 25-step epochs
    assert result.returncode == 130, result.stderr[-2000:]
    df = runs_of(tmp_path)
    assert list(df.status) == ["KILLED"]
    # The figure named: the tests' runs draw none unless they ask (conftest.CONFUSION_FIGURES).
    result = run_cli("resume=true", f"hydra.run.dir={run_dir}", "report.confusion_format=[png]",
                     cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    df = runs_of(tmp_path)
    assert len(df) == 1  # the same MLflow run, continued
    row = df.iloc[0]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    assert row.status == "FINISHED"
    assert row["params.conv.mode"] == "octave" and row["params.alpha"] == "0.25"
    assert row["params.trainer.epochs"] == "2"
    assert row["metrics.test_accuracy"] == pytest.approx(m["test_accuracy"])
    assert row["metrics.flops_per_image"] == m["flops_per_image"]
    assert (row["tags.conv"], row["tags.alpha"], row["tags.device"]) == ("octave", "0.25", "cpu")
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(row.run_id, "train_loss")
    assert sorted(h.step for h in history) == [1, 2]
    with open(os.path.join(run_dir, "epochs.csv")) as f:
        losses = [float(line.split(",")[1]) for line in f.read().splitlines()[1:]]
    assert sorted(h.value for h in history) == pytest.approx(sorted(losses))
    assert row["metrics.test_loss"] == pytest.approx(m["test_loss"])
    assert row["metrics.test_top5_accuracy"] == pytest.approx(m["test_top5_accuracy"])
    assert {a.path for a in client.list_artifacts(row.run_id)} == {
        "metrics.json", "epochs.csv", "config.yaml", "confusion_matrix.csv",
        "confusion_matrix.png", "per_class_accuracy.csv"}
    assert os.path.isdir(os.path.join(run_dir, "tensorboard"))  # loggers combined


@pytest.mark.slow
def test_a_sweep_is_one_experiment_with_a_run_per_job_and_its_report(tmp_path):
    sweep = str(tmp_path / "sweep")
    result = run_cli("-m", *SYNTHETIC_200_TWO_EPOCHS, "trainer.epochs=1", "conv=vanilla,octave",
                     "logger=mlflow", "logger.mlflow.experiment_name=my_sweep",
                     f"hydra.sweep.dir={sweep}", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    df = runs_of(tmp_path, "my_sweep")
    jobs = df[df["tags.kind"] != "sweep report"] if "tags.kind" in df else df
    assert sorted(jobs["tags.conv"]) == ["octave", "vanilla"]
    assert set(df["tags.sweep_dir"]) == {os.path.abspath(sweep)}
    report = df[df["tags.kind"] == "sweep report"]
    assert len(report) == 1
    client = mlflow.tracking.MlflowClient()
    files = {a.path for a in client.list_artifacts(report.run_id.iloc[0])}
    assert {"summary.md", "summary.csv", "pareto.csv", "accuracy_vs_flops.png"} <= files


#: The UI's install, as docs/search.md gives it and as it was verified (see there).
UI_COMMANDS = [
    "python -m venv mlflow-ui",
    "mlflow-ui/bin/pip install \"mlflow==$(.venv/bin/python -c 'import mlflow; "
    "print(mlflow.__version__)')\"",
    "mlflow-ui/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlruns.db",
]


def test_the_docs_give_the_verified_ui_install():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "docs", "search.md")) as f:
        lines = [line.strip() for line in f.read().splitlines()]
    starts = [i for i, line in enumerate(lines) if line == UI_COMMANDS[0]]
    assert len(starts) == 1
    given = lines[starts[0]:starts[0] + len(UI_COMMANDS)]
    assert [g.split("   #")[0].strip() for g in given] == UI_COMMANDS


@pytest.mark.slow
def test_the_documented_mlflow_ui_serves_the_runs(tmp_path):
    """The UI of docs/search.md's venv (OCTCONV_EXP_MLFLOW_UI: its mlflow executable) on the
    mlruns.db that run.py logger=mlflow writes into the working dir."""
    import socket
    import subprocess
    import time
    import urllib.request

    ui = os.environ.get("OCTCONV_EXP_MLFLOW_UI")
    if not ui:
        pytest.skip("OCTCONV_EXP_MLFLOW_UI is not set: no UI venv as docs/search.md installs "
                    "it (mlflow-skinny here has no UI)")
    res = run_cli("logger=mlflow", *SYNTHETIC_200_TWO_EPOCHS, f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([ui, "ui", "--backend-store-uri", f"sqlite:///{tmp_path}/mlruns.db",
                               "--port", str(port)], cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the UI did not answer"
            time.sleep(1)
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name"
                                    "?experiment_name=octconv-exp", timeout=10) as r:
            experiment = json.load(r)["experiment"]
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", method="POST",
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            runs = json.load(r)["runs"]
        assert [run["info"]["status"] for run in runs] == ["FINISHED"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
