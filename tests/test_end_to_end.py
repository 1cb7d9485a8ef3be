"""run.py end to end, in subprocesses, on offline data sets."""
import csv
import json
import os
from importlib import metadata

import pytest
import torch

from conftest import CIFAR_CLASSES, SYNTHETIC_2000, read_metrics, run_cli, run_python


@pytest.mark.slow
@pytest.mark.sdk
@pytest.mark.parametrize("mode", ["vanilla", "octave", "multi-octave"])
def test_each_conv_mode_learns_the_synthetic_data(mode, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(f"conv={mode}", "alpha=0.25", *SYNTHETIC_2000, f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["status"] == "completed"
    assert m["conv"] == mode and m["alpha"] == 0.25 and m["dataset"] == "synthetic"
    assert m["test_accuracy"] > 40.0  # chance is 10%
    assert m["test_samples"] == 500
    model_line = [line for line in (run_dir / "run.log").read_text().splitlines()
                  if "Model: seed_cnn" in line]
    assert len(model_line) == 1
    # Vanilla has no low-frequency channels: its log line names no alpha.
    shown = "conv=vanilla, " if mode == "vanilla" else f"conv={mode} alpha=0.25, "
    assert shown in model_line[0] and model_line[0].count("alpha") == (mode != "vanilla")
    assert m["params"] == 12346 and m["epochs"] == 2 and m["device"] == "cpu"
    for key in ("expansion", "seed", "train_loss", "train_accuracy", "train_images_per_second",
                "wall_seconds", "versions"):
        assert m[key] is not None, key
    assert m["train_images_per_second"] > 0
    assert m["versions"]["torch"] == metadata.version("torch")  # the torch that ran it
    assert m["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    # FLOPs of one 32x32 image (2 per multiply-add), counted: conv 3->16 at 32x32, 16->32 at
    # 16x16, 32->16 at 8x8 (3x3 kernels) and the 256->10 head. At alpha=0.25 the octave
    # convolutions cost (1-a_in)(1-a_out) + [(1-a_in)a_out + a_in(1-a_out) + a_in a_out]/4 of
    # a vanilla one: 0.8125, 0.671875 and 0.8125; the channels split exactly (4 of 16).
    vanilla = 2 * (3 * 16 * 9 * 1024 + 16 * 32 * 9 * 256 + 32 * 16 * 9 * 64 + 256 * 10)
    octave = (2 * 9 * (3 * 16 * 1024 * 0.8125 + 16 * 32 * 256 * 0.671875 + 32 * 16 * 64 * 0.8125)
              + 2 * 256 * 10)
    flops = vanilla if mode == "vanilla" else octave
    assert (vanilla, octave) == (3838976, 2788352)
    assert m["flops_per_image"] == flops
    assert m["flops_ratio"] == pytest.approx(flops / vanilla, abs=1e-12)
    assert m["flops_ratio_theoretical"] == pytest.approx(flops / vanilla, abs=1e-12)
    assert m["flops_ratio"] == pytest.approx({"vanilla": 1.0}.get(mode, 0.7263), abs=1e-4)
    assert m["versions"]["octconv"] == "0.1.0"
    with open(run_dir / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert int(rows[0]["train_images"]) == 2000  # 125 batches of 16, none dropped
    assert float(rows[-1]["train_loss"]) == pytest.approx(m["train_loss"])
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "run.log").exists()
    assert "Accuracy on test set:" in (run_dir / "run.log").read_text()
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["conv"] == mode and saved["alpha"] == 0.25
    assert sum(v.numel() for k, v in saved["state_dict"].items()
               if "running" not in k and "num_batches" not in k) == 12346
    assert not [p for p in os.listdir(run_dir) if p.startswith(".metrics")]  # no temp files left


@pytest.mark.slow
@pytest.mark.sdk
def test_cifar10_path_through_run_py(cifar_root, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false",
                  "dataset.verify_checksums=false", "conv=octave", "trainer.epochs=1",
                  "trainer.progress_bar=false", "trainer.test_batch_size=7",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["dataset"] == "cifar10" and m["test_samples"] == 60  # 8 full batches + a tail of 4
    # The confusion matrix names CIFAR-10's classes, from the data set's own batches.meta.
    with open(run_dir / "confusion_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == CIFAR_CLASSES == [r[0] for r in rows[1:]]
    assert list(m["test_per_class_accuracy"]) == CIFAR_CLASSES


@pytest.mark.slow
def test_cifar10_missing_is_one_line_and_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("dataset.download=false", f"dataset.root={tmp_path}", f"hydra.run.dir={run_dir}")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: CIFAR-10")
    assert "dataset=synthetic" in res.stderr
    m = read_metrics(run_dir)
    assert m["status"] == "failed" and "CIFAR-10" in m["error"]


@pytest.mark.slow
def test_image_folder_through_run_py(image_folder_root, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("dataset=image_folder", f"dataset.root={image_folder_root}", "conv=multi-octave",
                  "trainer.epochs=1", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["test_samples"] == 15
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["num_classes"] == 3 and saved["state_dict"]["fc.weight"].shape[0] == 3
    # The folders' names are the classes; with 3 of them top-5 says nothing.
    assert list(m["test_per_class_accuracy"]) == ["cats", "dogs", "owls"]
    assert m["test_top5_accuracy"] is None and m["test_loss"] > 0
    with open(run_dir / "per_class_accuracy.csv", newline="") as f:
        assert [int(r["images"]) for r in csv.DictReader(f)] == [5, 5, 5]


@pytest.mark.slow
def test_print_config_job():
    res = run_cli("--cfg", "job", "conv=octave", "alpha=0.8")
    assert res.returncode == 0, res.stderr
    assert "mode: octave" in res.stdout and "alpha: 0.8" in res.stdout
    assert "device_iterations: 50" in res.stdout


@pytest.mark.slow
@pytest.mark.sdk
def test_bad_override_is_one_line_and_exit_2(tmp_path):
    res = run_cli("conv=foo", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert res.stderr == ("error: conv=foo: not an option of config group 'conv'; choose one of: "
                          "multi-octave, octave, vanilla\n")
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.slow
def test_profile_dir_writes_a_trace_and_exits(tmp_path):
    prof = tmp_path / "prof"
    res = run_cli("conv=multi-octave", f"profile_dir={prof}", f"hydra.run.dir={tmp_path / 'run'}",
                  "dataset=synthetic")
    assert res.returncode == 0, res.stderr[-3000:]
    trace = json.loads((prof / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("conv" in n for n in names)
    assert "aten::" in (prof / "summary.txt").read_text()
    assert not (tmp_path / "run" / "model.pt").exists()  # profiled, not trained
    assert read_metrics(tmp_path / "run")["status"] == "profiled"


@pytest.mark.slow
def test_task_function_returns_test_accuracy(tmp_path):
    """Optimising sweepers read the return value of run.py's task function."""
    from conftest import REPO

    script = tmp_path / "call_main.py"  # a program of its own: the fork server runs it
    script.write_text(
        f"import sys; sys.path.insert(0, {REPO!r}); sys.argv = ['run.py'] + sys.argv[1:]\n"
        "import run\n"
        "from hydra import compose, initialize_config_dir\n"
        "from hydra.core.hydra_config import HydraConfig\n"
        f"with initialize_config_dir(version_base='1.3', config_dir='{REPO}/conf'):\n"
        "    cfg = compose('config', overrides=sys.argv[1:], return_hydra_config=True)\n"
        "    HydraConfig.instance().set_config(cfg)\n"
        "    import json, os\n"
        "    os.makedirs(cfg.hydra.runtime.output_dir, exist_ok=True)\n"
        "    from omegaconf import open_dict\n"
        "    with open_dict(cfg): del cfg['hydra']\n"
        "    acc = run.main(cfg)  # hydra.main passes a given cfg straight to the task function\n"
        "    print('RETURNED', acc, json.load(open(os.path.join(HydraConfig.get().runtime.output_dir, 'metrics.json')))['test_accuracy'])\n"
    )
    res = run_python(str(script), *SYNTHETIC_2000, "trainer.epochs=1", f"hydra.run.dir={tmp_path}",
                     f"hydra.runtime.output_dir={tmp_path}", cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RETURNED")][0]
    returned, recorded = line.split()[1:]
    assert float(returned) == float(recorded) > 10


@pytest.mark.slow
def test_scheduler_changes_the_rate_per_epoch(tmp_path):
    res = run_cli(*SYNTHETIC_2000, "dataset.train_size=200", "scheduler=step",
                  "scheduler.step_size=1", "scheduler.gamma=0.5", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "epochs.csv") as f:
        rates = [float(r["lr"]) for r in csv.DictReader(f)]
    assert rates == pytest.approx([0.05, 0.025])
    assert read_metrics(tmp_path)["scheduler"] == "step"


@pytest.mark.slow
def test_speed_settings(tmp_path):
    """channels_last (the CPU default), the plain memory format and torch.compile train the
    same model: the same losses, accuracies and weights to float tolerance. Per step they
    differ only by rounding (~1e-7), but training amplifies that: a max-pooling or ReLU tie
    decided the other way changes a gradient outright, and after 25 steps at this rate the
    mean losses differed by 1e-4 and some weights by 1e-2 here. So the runs are 8 steps
    long, where the rounding stays rounding (weights within 1e-6 here); the CUDA-only
    settings are refused on the CPU with one line."""
    runs = {}
    for name, extra in (("first", ["speed.channels_last=false", "speed.malloc=false"]),
                        ("last", ["speed.channels_last=true"]),
                        ("compiled", ["speed.compile=true"])):
        res = run_cli(*SYNTHETIC_2000, "conv=multi-octave", "trainer.epochs=1",
                      "dataset.train_size=128", *extra, f"hydra.run.dir={tmp_path / name}")
        assert res.returncode == 0, res.stderr[-3000:]
        m = read_metrics(tmp_path / name)
        with open(tmp_path / name / "epochs.csv") as f:
            (row,) = csv.DictReader(f)
        weights = torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]
        runs[name] = (m, row, weights)
    default, default_row, default_weights = runs["last"]  # channels_last: auto is true on CPU
    assert default["test_samples"] == 500 and int(default_row["train_images"]) == 128
    # speed.compile=auto: off on this CPU, where compiled steps measured no faster.
    assert default["compiled"] is False and default["compile_decision"].startswith("auto: off")
    assert runs["compiled"][0]["compiled"] is True
    # speed.malloc=auto: on for the CPU (glibc here); off as asked, with the same losses below
    assert default["malloc"].startswith("on: auto: on (CPU, glibc)")
    assert runs["first"][0]["malloc"] == "off: speed.malloc=false"
    for name in ("first", "compiled"):
        m, row, weights = runs[name]
        assert m["train_loss"] == pytest.approx(default["train_loss"], rel=1e-5, abs=0), name
        assert float(row["train_loss"]) == pytest.approx(float(default_row["train_loss"]),
                                                         rel=1e-5, abs=0), name
        assert m["train_accuracy"] == default["train_accuracy"], name
        assert abs(m["test_accuracy"] - default["test_accuracy"]) <= 0.2, name  # 1 image of 500
        assert weights.keys() == default_weights.keys()
        for key, value in default_weights.items():
            difference = (weights[key].float() - value.float()).abs().max().item()
            assert difference <= 1e-6, (name, key, difference)
    res = run_cli(*SYNTHETIC_2000, "device=cpu", "speed.autocast_bf16=true",
                  f"hydra.run.dir={tmp_path / 'bf16'}")
    assert res.returncode == 2 and "CUDA only" in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.slow
def test_piped_output_has_no_bars_and_metrics_carry_iso_times(tmp_path):
    import datetime

    run_dir = tmp_path / "run"
    res = run_cli("conv=octave", "alpha=0.25", *SYNTHETIC_2000, "trainer.epochs=1",
                  "trainer.progress_bar=true", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "it/s" not in res.stderr and "\r" not in res.stderr  # stderr is a pipe here
    m = read_metrics(run_dir)
    started = datetime.datetime.fromisoformat(m["started"])
    finished = datetime.datetime.fromisoformat(m["finished"])
    assert started.tzinfo is not None and started <= finished
    assert abs(started.timestamp() - m["started_at"]) < 1

