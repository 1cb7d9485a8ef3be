"""Hostile inputs to sweeps, second part (issue 25, items 19, 20 and 23): a damaged optuna.db,
a sweep report over a job dir whose name is not UTF-8 or into a summary.md that is a folder,
a joblib worker or loky's resource tracker killed with SIGKILL, and a comma in
hydra.sweep.dir under -m. Each ends in one line and a non-zero exit where something did not
get done, and leaves what was recorded as it was."""
import json
import os
import shutil
import signal

import pytest

from conftest import (ALPHA_SEARCH_160, JOBLIB_SWEEP, SYNTHETIC_64_ONE_EPOCH,
                      only_error_line, read_metrics, release_joblib_sweep, run_cli, run_python, snapshot,
                      start_joblib_sweep)

# ------------------------------------------------------------------ 19: a damaged optuna.db

SEARCH = [*ALPHA_SEARCH_160, "hydra.sweeper.n_trials=1"]


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    pytest.importorskip("optuna")
    sweep_dir = tmp_path_factory.mktemp("search") / "s"
    res = run_cli(*SEARCH, f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_optuna_db_is_one_line_exit_2_and_changes_nothing(finished_search, tmp_path,
                                                                    damage):
    sweep_dir = tmp_path / "s"
    shutil.copytree(finished_search, sweep_dir)
    db = sweep_dir / "optuna.db"
    data = db.read_bytes()
    db.write_bytes(data[:5000] if damage == "truncated" else bytes(range(256)) * 80)
    before = snapshot(sweep_dir)
    res = run_cli(*SEARCH, "resume=true", f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 2, res.stderr[-3000:]
    line = only_error_line(res.stderr)
    assert line.startswith(f"error: hydra.sweep.dir={sweep_dir}: the search's study storage "
                           f"{db} cannot be read ("), line
    assert "restore it from a copy, or choose another hydra.sweep.dir" in line
    assert snapshot(sweep_dir) == before


# ------------------------------------------------------------------ 19: the report CLI


def fake_run(run_dir, accuracy):
    """A completed run's record as the report reads it (no training needed)."""
    os.makedirs(os.path.join(run_dir, ".hydra"))
    with open(os.path.join(run_dir, ".hydra", "overrides.yaml"), "w") as f:
        f.write("- conv=octave\n- alpha=0.5\n")
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"status": "completed", "conv": "octave", "alpha": 0.5, "expansion": 1,
                   "optimizer": "sgd", "seed": 0, "dataset": "synthetic",
                   "test_accuracy": accuracy, "train_loss": 1.5}, f)


def report(sweep_dir):
    return run_python("-m", "octconv_exp.report", os.fsdecode(sweep_dir), "--no-plots",
                      timeout=300)


def test_the_report_escapes_a_job_dir_name_that_is_not_utf8(tmp_path):
    sweep_dir = str(tmp_path / "sw")
    fake_run(os.path.join(sweep_dir, os.fsdecode(b"conv=octave,\xff"), "seed=0"), 42.0)
    fake_run(os.path.join(sweep_dir, "conv=octave,alpha=0.5", "seed=1"), 44.0)
    res = report(sweep_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr == "" and res.stdout.startswith("2 runs; summary: ")
    with open(os.path.join(sweep_dir, "summary.md"), encoding="utf-8") as f:
        assert "conv=octave,\\xff/seed=0" in f.read()
    with open(os.path.join(sweep_dir, "summary.csv"), encoding="utf-8") as f:
        assert "conv=octave,\\xff/seed=0" in f.read()


def test_the_report_cli_with_summary_md_a_folder_is_one_line_and_exit_2(tmp_path):
    sweep_dir = tmp_path / "sw"
    fake_run(str(sweep_dir / "conv=octave,alpha=0.5" / "seed=0"), 42.0)
    (sweep_dir / "summary.md").mkdir()
    res = report(sweep_dir)
    assert res.returncode == 2, res.stderr[-3000:]
    assert only_error_line(res.stderr) == (
        f"error: cannot write {sweep_dir}/summary.md: is a directory; the previous version, "
        "if any, is intact")
    assert os.listdir(sweep_dir / "summary.md") == []


# ------------------------------------------------------------------ 23: a comma in the sweep dir


def test_hydra_keys_with_a_comma_are_quoted_under_m_and_sweeps_of_paths_are_not():
    from octconv_exp.cli.preflight import quote_paths

    assert quote_paths(["hydra.sweep.dir=sw/a,b", "ckpt_path=a,b", "dataset.root=r1,r2"],
                       True) == ['hydra.sweep.dir="sw/a,b"', "ckpt_path=a,b", "dataset.root=r1,r2"]
    assert quote_paths(["ckpt_path=a,b"], False) == ['ckpt_path="a,b"']


@pytest.mark.slow
def test_a_sweep_dir_with_a_comma_works_under_m(tmp_path):
    res = run_cli("-m", *SYNTHETIC_64_ONE_EPOCH, "conv=octave", "alpha=0.25,0.5",
                  "hydra.sweep.dir=sw/a,b", cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    sweep_dir = tmp_path / "sw" / "a,b"
    for alpha in ("0.25", "0.5"):
        assert read_metrics(sweep_dir / f"alpha={alpha}" / "seed=0")["status"] == "completed"
    assert (sweep_dir / "summary.md").is_file()


# ------------------------------------------------------------------ 20: joblib workers killed

def children(pid):
    """(pid, command line) of the processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append((int(entry), cmdline))
    return found


@pytest.mark.slow
def test_kill_9_of_a_joblib_worker_is_one_line_with_the_report_and_the_way_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start_joblib_sweep(sweep_dir, timeout=300, training=("conv=vanilla",))
    with open(sweep_dir / "conv=vanilla" / "seed=0" / ".lock") as f:
        os.kill(json.load(f)["pid"], signal.SIGKILL)
    release_joblib_sweep(sweep_dir)  # the other jobs go on
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    line = only_error_line(err)
    assert "conv=vanilla/seed=0" in line and "joblib worker" in line
    assert f"the report of the jobs with records is in {sweep_dir}/summary.md" in line
    summary = (sweep_dir / "summary.md").read_text()
    assert "never started" in summary  # conv=multi-octave, from jobs.yaml
    command = line.split("continue it (finished jobs are kept, the others go on from their "
                         "checkpoints) with: ")[1]
    assert command.endswith(f"hydra.sweep.dir={sweep_dir} resume=true"), command
    again = run_cli(*JOBLIB_SWEEP, f"hydra.sweep.dir={sweep_dir}", "resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    for conv in ("vanilla", "octave", "multi-octave"):
        assert read_metrics(sweep_dir / f"conv={conv}" / "seed=0")["status"] == "completed"


@pytest.mark.slow
def test_kill_9_of_lokys_resource_tracker_is_one_warning_and_the_jobs_complete(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start_joblib_sweep(sweep_dir, timeout=300, training=("conv=vanilla",))
    trackers = [pid for pid, cmd in children(proc.pid) if "loky.backend.resource_tracker" in cmd]
    assert len(trackers) == 1, children(proc.pid)
    os.kill(trackers[0], signal.SIGKILL)
    release_joblib_sweep(sweep_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert err == (f"warning: joblib's resource tracker process died and was restarted; the "
                   f"jobs go on; its messages go to {sweep_dir}/joblib_resource_tracker.log\n")
    for conv in ("vanilla", "octave", "multi-octave"):
        assert read_metrics(sweep_dir / f"conv={conv}" / "seed=0")["status"] == "completed"
