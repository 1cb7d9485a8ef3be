"""Hostile inputs to sweeps and searches (issue 25, round three): command lines Hydra's
grammar refuses, a report that cannot be written, a resumed sweep that would change its jobs,
two searches in one sweep dir, interrupted searches, and SIGTERM to a joblib sweep's own
process. Each ends in one line and a non-zero exit, and leaves what was recorded as it was."""
import json
import os
import signal

import pytest

from conftest import (ALPHA_SEARCH_160, SYNTHETIC_64_ONE_EPOCH, only_error_line, optuna_study,
                      read_metrics, run_cli, snapshot, start_joblib_sweep)

# ------------------------------------------------------------------ the override grammar


@pytest.mark.parametrize("args, shown", [
    (["alpha=0.5)"], "error: alpha=0.5): not a valid Hydra override (extraneous input ')'"),
    (["-m", "alpha=[0.25"], "error: alpha=[0.25: not a valid Hydra override (no viable "),
    (["hydra.run.dir=runs/x(1)"], "error: hydra.run.dir=runs/x(1): Hydra's override grammar "
     "takes ( ) [ ] { } and quotes in a value only when the value is quoted for Hydra; write it "
     "as 'hydra.run.dir=\"runs/x(1)\"'"),
    (["ckpt_path=runs/x[1]/model.pt"], "error: ckpt_path=runs/x[1]/model.pt: Hydra's override "
     "grammar takes ( ) [ ] { } and quotes in a value only when the value is quoted for Hydra; "
     "write it as 'ckpt_path=\"runs/x[1]/model.pt\"'"),
    (["hydra.run.dir=runs/\udcff"], "error: hydra.run.dir=runs/\\xff: not valid UTF-8"),
    (["+model.command=echo a > f"], "error: +model.command=echo a > f: not a valid Hydra "
     "override (a character it does not take unquoted)"),
])
def test_an_override_hydra_cannot_parse_is_one_line_and_exit_2(tmp_path, args, shown):
    res = run_cli(*args, "dataset=synthetic", cwd=str(tmp_path))
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(shown), res.stderr
    assert os.listdir(tmp_path) == []  # no run dir, no outputs/, no file named f


def test_the_quoting_the_message_gives_works(tmp_path):
    """The override the grammar error suggests is one Hydra takes: the run dir is the path."""
    import shlex

    res = run_cli(*SYNTHETIC_64_ONE_EPOCH, "hydra.run.dir=runs/x(1)", cwd=str(tmp_path))
    (override,) = shlex.split(res.stderr.split("write it as ")[1])
    res = run_cli(*SYNTHETIC_64_ONE_EPOCH, override, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(tmp_path / "runs" / "x(1)")["status"] == "completed"


# ------------------------------------------------------------------ the sweep report


@pytest.mark.slow
def test_a_report_that_cannot_be_written_fails_the_sweep_in_one_line(tmp_path):
    sweep_dir = tmp_path / "s"
    (sweep_dir / "summary.md").mkdir(parents=True)  # a folder where the report goes
    res = run_cli("-m", *SYNTHETIC_64_ONE_EPOCH, f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert only_error_line(res.stderr) == (
        f"error: sweep report: cannot write {sweep_dir}/summary.md: is a directory; the "
        "previous version, if any, is intact")


# ------------------------------------------------------------------ a resumed sweep


@pytest.mark.slow
def test_a_resume_that_would_change_the_jobs_is_refused_before_anything_is_written(tmp_path):
    sweep_dir = tmp_path / "s"
    args = ["-m", *SYNTHETIC_64_ONE_EPOCH, "conv=octave", "alpha=0.25,0.5",
            f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(sweep_dir)
    res = run_cli(*args, "optimizer.lr=0.1", "resume=true")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(
        f"error: resume=true: {sweep_dir}/alpha=0.25/seed=0/checkpoints/last.pt was trained "
        "with optimizer.lr=0.05; this command sets optimizer.lr=0.1"), res.stderr
    assert snapshot(sweep_dir) == before  # jobs.yaml and multirun.yaml too, byte for byte


# ------------------------------------------------------------------ searches

pytest.importorskip("optuna")

SEARCH = [*ALPHA_SEARCH_160, "hydra.sweeper.n_trials=2"]


@pytest.fixture(scope="module")
def interrupted_search(tmp_path_factory):
    """A search stopped by Ctrl-C at its first trial's second step."""
    sweep_dir = tmp_path_factory.mktemp("search") / "s"
    res = run_cli(*SEARCH, f"hydra.sweep.dir={sweep_dir}", env={"OCTCONV_EXP_SIGNAL_AT": "step:2"})
    return sweep_dir, res


@pytest.mark.slow
def test_an_interrupted_search_runs_its_trials_again_from_their_checkpoints(interrupted_search,
                                                                            tmp_path):
    import shutil

    sweep_dir = tmp_path / "s"
    shutil.copytree(interrupted_search[0], sweep_dir)  # the module's copy stays interrupted
    res = interrupted_search[1]
    assert res.returncode == 130, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    (stopped,) = optuna_study(sweep_dir).trials  # no trial asked after the signal, none told FAIL
    assert stopped.state.name == "RUNNING"
    assert read_metrics(sweep_dir / "trial=0")["status"] == "interrupted"
    again = run_cli(*SEARCH, "resume=true", f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    done = optuna_study(sweep_dir).trials
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    assert done[0].params == stopped.params
    log = (sweep_dir / "trial=0" / "run.log").read_text()
    assert "Resuming from" in log and "2 step(s) into epoch 1" in log
    m = read_metrics(sweep_dir / "trial=0")
    assert done[0].values == [m["val_accuracy"], m["flops_per_image"]]
    assert not (sweep_dir / "trial=2").exists()


@pytest.mark.slow
@pytest.mark.parametrize("change, line", [
    (["hydra.sweeper.study_name=other"], " holds another search (study_name: alpha_search there, "
                                         "other here)"),
    (["alpha=choice(0.25,0.5)"], " holds another search (search_space.alpha: "
                                 "choice(0.125,0.25,0.375,0.5,0.625,0.75) there, "
                                 "choice(0.25,0.5) here)"),
    ("empty optuna.db", ": trial=0 hold(s) the records of trials that study alpha_search"),
    ("locked", ": another sweep runs in it (pid {pid} on "),
])
def test_a_sweep_dir_holds_one_study_and_one_search_at_a_time(interrupted_search, tmp_path,
                                                               change, line):
    import fcntl
    import shutil

    sweep_dir = tmp_path / "s"
    shutil.copytree(interrupted_search[0], sweep_dir)
    args = list(change) if isinstance(change, list) else []
    if change == "empty optuna.db":
        (sweep_dir / "optuna.db").write_bytes(b"")
        (sweep_dir / "study.yaml").unlink()  # a sweep dir of an older octconv-exp
    before = snapshot(sweep_dir)
    held = None
    if change == "locked":  # what a live search holds
        held = os.open(sweep_dir / ".sweep.lock", os.O_RDWR)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(held, 0)
        os.pwrite(held, json.dumps({"pid": os.getpid(), "host": "here"}).encode(), 0)
    try:
        res = run_cli(*SEARCH, *args, "resume=true", f"hydra.sweep.dir={sweep_dir}")
    finally:
        if held is not None:
            os.close(held)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: hydra.sweep.dir={sweep_dir}"
                                 + line.format(pid=os.getpid())), res.stderr
    after = snapshot(sweep_dir)
    if change == "empty optuna.db":  # the file the test emptied is all Optuna touched
        after.pop("optuna.db"), before.pop("optuna.db")
    assert after == before
    assert [t.state.name for t in optuna_study(interrupted_search[0]).trials] == ["RUNNING"]


# ------------------------------------------------------------------ signals to a sweep


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweeps_own_process_stops_its_workers(tmp_path):
    """kill PID (a scheduler's SIGTERM) reaches the sweep's process, not its joblib workers:
    they read it from the sweep dir, stop the running jobs at a step and start no other."""
    sweep_dir = tmp_path / "sweep"
    proc = start_joblib_sweep(sweep_dir, timeout=300)
    proc.send_signal(signal.SIGTERM)  # the sweep's own process only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    for conv in ("vanilla", "octave"):
        m = read_metrics(sweep_dir / f"conv={conv}" / "seed=0")
        assert m["status"] == "interrupted" and "interrupted by SIGTERM at epoch 1" in m["error"]
    m = read_metrics(sweep_dir / "conv=multi-octave" / "seed=0")
    assert m["status"] == "interrupted" and m["error"].startswith(
        "not started: the sweep was interrupted by SIGTERM")
    assert "Training" not in (sweep_dir / "conv=multi-octave" / "seed=0" / "run.log").read_text()
