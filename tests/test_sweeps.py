"""Multiruns: layout, vanilla de-duplication, summaries, plots, failures, launchers, presets."""
import json
import os

import pytest

from conftest import (REPO, SYNTHETIC_400_ONE_EPOCH, popen_python, read_csv, read_metrics,
                      release_joblib_sweep, run_cli, run_python, start_joblib_sweep)
from octconv_exp.reports import report
from octconv_exp.config.resolvers import config_name
from octconv_exp.sweeps.sweep import dedupe_vanilla

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_summary_holds_every_run(sweep_dir):
    """summary.csv: one completed row per run dir with a metrics.json, its numbers that run's."""
    rows = read_csv(os.path.join(sweep_dir, "summary.csv"))
    runs = sorted(os.path.relpath(os.path.dirname(p), sweep_dir) for p in _metrics_files(sweep_dir))
    assert runs and sorted(r["run_dir"] for r in rows) == runs
    for row in rows:
        m = read_metrics(os.path.join(sweep_dir, row["run_dir"]))
        assert row["status"] == "completed" and row["conv"] == m["conv"]
        assert float(row["test_accuracy"]) == pytest.approx(m["test_accuracy"])
        assert int(row["flops_per_image"]) == m["flops_per_image"]
    return rows


def assert_png(path):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()


# ------------------------------------------------------------------------------ names


def test_job_names_are_readable_and_keep_noise_out():
    assert config_name(["alpha=0.25", "conv=octave", "seed=3"]) == "conv=octave,alpha=0.25"
    assert config_name([]) == "defaults"
    a = config_name(["conv=octave", "dataset.root=/data/a"])
    b = config_name(["conv=octave", "dataset.root=/data/b"])
    assert a.startswith("conv=octave,~") and "/" not in a and a != b  # paths: a hash, never a clash
    assert config_name(["optimizer=adam", "conv=vanilla"]) == "conv=vanilla,optimizer=adam"
    assert "/" not in config_name(["conv.multi_conv.partials_types=[half/float]"])


def test_dedupe_vanilla_keeps_one_vanilla_per_configuration():
    jobs = [[f"conv={c}", f"alpha={a}"] for c in ("vanilla", "octave") for a in (0.25, 0.5)]
    jobs += [["conv=vanilla", "alpha=0.25", "seed=1"]]
    kept, dropped = dedupe_vanilla(jobs, lambda job: job[0].split("=")[1])
    assert dropped == 1
    assert kept == [["conv=vanilla"], ["conv=octave", "alpha=0.25"], ["conv=octave", "alpha=0.5"],
                    ["conv=vanilla", "seed=1"]]


# ------------------------------------------------------------------------------ multirun


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "s"
    res = run_cli("-m", "conv=vanilla,octave,multi-octave", "alpha=0.25,0.5", "seed=0,1",
                  *SYNTHETIC_400_ONE_EPOCH, f"hydra.sweep.dir={sweep_dir}")
    return sweep_dir, res


@pytest.mark.slow
def test_multirun_layout_summary_and_plots(sweep):
    sweep_dir, res = sweep
    assert res.returncode == 0, res.stderr[-3000:]
    dirs = sorted(os.path.relpath(os.path.dirname(p), sweep_dir)
                  for p in _metrics_files(sweep_dir))
    # Vanilla trained once per seed (not once per alpha); one directory level per seed.
    expected = sorted([f"conv=vanilla/seed={s}" for s in (0, 1)]
                      + [f"conv={c},alpha={a}/seed={s}" for c in ("octave", "multi-octave")
                         for a in (0.25, 0.5) for s in (0, 1)])
    assert dirs == expected
    assert "2 duplicate vanilla job(s) not launched" in res.stdout + res.stderr

    rows = read_csv(sweep_dir / "summary.csv")
    assert len(rows) == 10
    assert [r["conv"] for r in rows][:2] == ["vanilla", "vanilla"]
    assert [(r["conv"], r["alpha"]) for r in rows][2:6] == [("octave", "0.25")] * 2 + [("octave", "0.5")] * 2
    for row in rows:
        m = read_metrics(sweep_dir / row["run_dir"])
        assert float(row["test_accuracy"]) == pytest.approx(m["test_accuracy"])
        assert float(row["train_loss"]) == pytest.approx(m["train_loss"])
        assert int(row["params"]) == m["params"] and int(row["seed"]) == m["seed"]
        assert int(row["flops_per_image"]) == m["flops_per_image"]
        assert row["status"] == "completed"
    assert all(r["alpha"] == "" for r in rows if r["conv"] == "vanilla")

    groups = read_csv(sweep_dir / "summary_by_config.csv")
    assert len(groups) == 5 and all(g["n"] == "2" for g in groups)
    octave = next(g for g in groups if g["conv"] == "octave" and g["alpha"] == "0.25")
    accs = [read_metrics(sweep_dir / f"conv=octave,alpha=0.25/seed={s}")["test_accuracy"]
            for s in (0, 1)]
    assert float(octave["test_accuracy"]) == pytest.approx(sum(accs) / 2)
    assert float(octave["test_accuracy_std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)

    md = (sweep_dir / "summary.md").read_text()
    assert md.count("| vanilla | — |") == 3  # the baseline once by configuration, and its 2 runs
    assert " ± " in md
    for name in report.PLOTS:
        assert_png(sweep_dir / name)


def _metrics_files(root):
    for dirpath, _, files in os.walk(root):
        if "metrics.json" in files:
            yield os.path.join(dirpath, "metrics.json")


@pytest.mark.slow
def test_report_command_rebuilds_from_disk(sweep, tmp_path):
    sweep_dir, res = sweep
    assert res.returncode == 0
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    for name in ("summary.csv", "summary.md", "summary_by_config.csv", *report.PLOTS):
        (copy / name).unlink()
    out = run_python("-m", "octconv_exp.report", str(copy), timeout=300)
    assert out.returncode == 0, out.stderr
    assert read_csv(copy / "summary.csv") == [
        {**r, "run_dir": r["run_dir"]} for r in read_csv(sweep_dir / "summary.csv")]
    for name in report.PLOTS:
        assert_png(copy / name)
    bad = run_python("-m", "octconv_exp.report", str(tmp_path / "nope"), timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_sweep_exits_non_zero(tmp_path):
    sweep_dir = tmp_path / "s"
    res = run_cli("-m", "conv=octave", "optimizer.lr=0.05,1e30", *SYNTHETIC_400_ONE_EPOCH,
                  f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 1
    assert "1 of 2 runs did not complete" in res.stderr
    assert "Traceback" not in res.stderr
    rows = {r["run_dir"]: r for r in read_csv(sweep_dir / "summary.csv")}
    bad = rows["optimizer.lr=1e+30/seed=0"]
    assert bad["status"] == "diverged" and "epoch 1, step" in bad["error"]
    assert rows["optimizer.lr=0.05/seed=0"]["status"] == "completed"
    assert "diverged" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_interrupted_sweep_reports_missing_runs(sweep, tmp_path):
    sweep_dir, _ = sweep
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    (copy / "conv=octave,alpha=0.5" / "seed=1" / "metrics.json").unlink()  # a job that was killed
    runs = report.build_report(str(copy), make_plots=False)
    missing = [r for r in runs if r["status"] == "missing"]
    assert [r["run_dir"] for r in missing] == ["conv=octave,alpha=0.5/seed=1"]
    assert "1 of 10 runs did not complete" in report.failure_line(str(copy), runs)


@pytest.mark.slow
def test_two_sweeps_started_together_never_share_a_directory(tmp_path):
    procs = [popen_python(os.path.join(REPO, "run.py"), "-m", "conv=octave",
                          *SYNTHETIC_400_ONE_EPOCH, "dataset.train_size=64", "dataset.test_size=32",
                          cwd=tmp_path)
             for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    sweeps = [os.path.join(d, s) for d in (tmp_path / "multirun").iterdir() for s in os.listdir(d)]
    assert len(sweeps) == 2
    for s in sweeps:
        assert len(assert_summary_holds_every_run(s)) == 1


# ------------------------------------------------------------------------------ launchers


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_with_a_share_of_the_cores(tmp_path):
    """Two jobs in two loky workers, each held after its second step until both are (the
    OCTCONV_EXP_PAUSE_AT hook): they ran at the same time however fast either trains."""
    sweep_dir = tmp_path / "s"
    proc = start_joblib_sweep(sweep_dir, timeout=300, sweep=[
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "conv=vanilla,octave",
        *SYNTHETIC_400_ONE_EPOCH])
    release_joblib_sweep(sweep_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    runs = [read_metrics(os.path.dirname(p)) for p in _metrics_files(sweep_dir)]
    assert len(runs) == 2
    assert runs[0]["pid"] != runs[1]["pid"] != os.getpid()  # two worker processes...
    first, second = sorted(runs, key=lambda m: m["started_at"])
    assert second["started_at"] < first["finished_at"]  # ...running at the same time
    cores = os.cpu_count()
    assert all(m["torch_threads"] == max(1, cores // min(2, cores)) for m in runs)
    rows = assert_summary_holds_every_run(sweep_dir)
    assert sorted(r["conv"] for r in rows) == ["octave", "vanilla"]


@pytest.mark.slow
@pytest.mark.sdk
def test_submitit_local_runs_a_job(tmp_path):
    sweep_dir = tmp_path / "s"
    res = run_cli("-m", "hydra/launcher=submitit_local", "conv=octave", *SYNTHETIC_400_ONE_EPOCH,
                  f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    (m,) = [read_metrics(os.path.dirname(p)) for p in _metrics_files(sweep_dir)]
    assert m["status"] == "completed" and m["pid"] != os.getpid()
    assert m["torch_threads"] == 1  # our submitit_local default: cpus_per_task 1
    assert (sweep_dir / ".submitit").is_dir()
    assert len(assert_summary_holds_every_run(sweep_dir)) == 1
    assert f"{m['test_accuracy']:.2f}" in (sweep_dir / "summary.md").read_text()


def test_launcher_configs_carry_our_defaults():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from octconv_exp.config import schema as config  # noqa: F401  (registers the schema config.yaml names)

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(REPO, "conf")):
        slurm = compose("config", overrides=["hydra/launcher=submitit_slurm"],
                        return_hydra_config=True).hydra.launcher
        joblib = compose("config", overrides=["hydra/launcher=joblib"],
                         return_hydra_config=True).hydra.launcher
    GlobalHydra.instance().clear()
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.timeout_min, slurm.cpus_per_task, slurm.gpus_per_node) == (240, 8, 1)
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2


# ------------------------------------------------------------------------------ loggers


@pytest.mark.slow
def test_tensorboard_logger_writes_scalars_and_hparams(tmp_path):
    res = run_cli(*SYNTHETIC_400_ONE_EPOCH, "trainer.epochs=2", "logger=tensorboard",
                  f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]
    assert "test_accuracy" in acc.Tags()["scalars"]
    hparams = EventAccumulator(str(tmp_path / "tensorboard" / "hparams"))
    hparams.Reload()
    assert "final/test_accuracy" in hparams.Tags()["scalars"]
    rows = read_csv(tmp_path / "epochs.csv")  # CSV stays on, with what TensorBoard got
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(
        [e.value for e in acc.Scalars("train_loss")], rel=1e-6)


def test_job_subdirs_name_what_varies():
    from octconv_exp.sweeps.sweep import job_subdirs

    jobs = [["conv=octave", "alpha=0.25", "trainer.epochs=2"], ["conv=octave", "alpha=0.5", "trainer.epochs=2"]]
    assert job_subdirs(jobs, lambda job: 0) == ["alpha=0.25/seed=0", "alpha=0.5/seed=0"]
    single = [["conv=octave", "trainer.progress_bar=false", "dataset.root=/x"]]
    assert job_subdirs(single, lambda job: 3) == ["conv=octave/seed=3"]


def test_report_survives_any_single_bad_file(tmp_path):
    """One good run beside a non-dict metrics.json, a string alpha, a corrupt overrides.yaml
    and a job without metrics: the report is written, each bad one is named."""
    from octconv_exp.reports.report import build_report

    def job(name, metrics=None, overrides=None, raw_metrics=None):
        d = tmp_path / name / "seed=0"
        (d / ".hydra").mkdir(parents=True)
        if overrides is not None:
            (d / ".hydra" / "overrides.yaml").write_text(overrides)
        if metrics is not None:
            (d / "metrics.json").write_text(json.dumps(metrics))
        if raw_metrics is not None:
            (d / "metrics.json").write_text(raw_metrics)

    good = {"status": "completed", "conv": "octave", "alpha": 0.25, "seed": 0,
            "test_accuracy": 80.0, "params": 12346, "flops_per_image": 2790000}
    job("conv=octave,alpha=0.25", good, "- conv=octave\n- alpha=0.25\n")
    job("list", raw_metrics="[1, 2]", overrides="- conv=octave\n")
    job("stringy", dict(good, alpha="a quarter", seed="zero", test_accuracy="high"),
        "- conv=octave\n")
    job("corrupt", dict(good, alpha=0.5), "- conv=octave\nalpha: [unclosed\n")
    job("never", overrides="- conv=vanilla\n")
    runs = build_report(str(tmp_path), make_plots=False)
    by_dir = {r["run_dir"].split("/")[0]: r for r in runs}
    assert by_dir["conv=octave,alpha=0.25"]["status"] == "completed"
    assert by_dir["list"]["status"] == "unreadable" and "not an object" in by_dir["list"]["error"]
    assert by_dir["stringy"]["alpha"] is None and by_dir["stringy"]["test_accuracy"] is None
    assert by_dir["corrupt"]["status"] == "unreadable" and "overrides.yaml" in by_dir["corrupt"]["error"]
    assert by_dir["never"]["status"] == "missing"
    rows = {r["run_dir"].split("/")[0]: r for r in read_csv(tmp_path / "summary.csv")}
    assert {k: r["status"] for k, r in rows.items()} == {k: r["status"] for k, r in by_dir.items()}
    assert float(rows["conv=octave,alpha=0.25"]["test_accuracy"]) == 80.0
    assert rows["stringy"]["test_accuracy"] == ""
    md = (tmp_path / "summary.md").read_text()
    assert all(name in md for name in ("list", "corrupt", "never"))  # each bad one named
