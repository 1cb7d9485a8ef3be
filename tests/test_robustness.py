"""Runs that survive: checkpoints, resume, interruption, divergence, determinism, CI validation."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (CONFUSION_FIGURES, REPO, SWEEP_FIGURES, SYNTHETIC_1200_OCTAVE, read_epochs,
                      read_metrics, run_cli, run_python, start_joblib_sweep)

SAME = ("train_loss", "train_accuracy", "test_accuracy", "test_samples", "epochs_completed")


def losses(run_dir):
    return [row["train_loss"] for row in read_epochs(run_dir)]


def epoch_rows(run_dir):
    """epochs.csv without its timing columns."""
    return [{k: r[k] for k in ("epoch", "train_loss", "train_accuracy", "train_images")}
            for r in read_epochs(run_dir)]


#: The reference run's data and model, and those of every run compared with it or continuing
#: it: octave at alpha 0.25, 400 training images in batches of 8 (:data:`STEPS_PER_EPOCH`), 300
#: test images. The test hook stops a run at an exact step, so an epoch only has to be longer
#: than the steps a test stops inside it; at 50 steps, the epoch's sums are still folded in
#: mid-epoch (every 25 steps, loop.train_epoch), after a resume too.
REFERENCE_RUN = [*SYNTHETIC_1200_OCTAVE, "dataset.train_size=400"]
#: Training steps an epoch of :data:`REFERENCE_RUN`: 400 images in batches of 8.
STEPS_PER_EPOCH = 400 // 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run, the yardstick of the resume tests."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli(*REFERENCE_RUN, "trainer.epochs=3", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_checkpoints_after_every_epoch(reference, tmp_path):
    # Killed outright (no handler runs, so nothing is saved on the way out) on the first step
    # of epoch k + 1: last.pt must already hold epoch k, as the uninterrupted run trained it.
    with open(reference / "epochs.csv") as f:
        reference_losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    for k in (1, 2):
        run_dir = tmp_path / f"killed_in_epoch_{k + 1}"
        res = run_cli(*REFERENCE_RUN, "trainer.epochs=3", f"hydra.run.dir={run_dir}",
                      env={"OCTCONV_EXP_SIGNAL_AT": f"step:{STEPS_PER_EPOCH * k + 1}",
                           "OCTCONV_EXP_SIGNAL": "SIGKILL"})
        assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
        saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        assert saved["epoch"] == k and saved["progress"] is None
        assert [e["epoch"] for e in saved["epochs"]] == list(range(1, k + 1))
        assert [e["train_loss"] for e in saved["epochs"]] == pytest.approx(
            reference_losses[:k], rel=1e-6)
    ckpt_dir = reference / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["best.pt", "last.pt"]  # nothing half-written left
    last = torch.load(ckpt_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and last["progress"] is None
    for key in ("state_dict", "optimizer", "scheduler", "rng", "loader", "epochs", "config"):
        assert key in last
    assert [e["epoch"] for e in last["epochs"]] == [1, 2, 3]
    best = torch.load(ckpt_dir / "best.pt", weights_only=True)
    assert best["best"] == min(e["train_loss"] for e in last["epochs"])


@pytest.mark.slow
@pytest.mark.sdk
def test_resume_after_epoch_k_matches_an_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(*REFERENCE_RUN, "trainer.epochs=2", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli(*REFERENCE_RUN, "trainer.epochs=3", "resume=true",
                      f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    ref, got = read_metrics(reference), read_metrics(run_dir)
    assert {k: got[k] for k in SAME} == {k: ref[k] for k in SAME}
    assert losses(run_dir) == losses(reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig, step, epoch, steps_in", [
    ("SIGINT", STEPS_PER_EPOCH + 10, 1, 10),  # inside epoch 2: resume skips 10 batches
    ("SIGTERM", STEPS_PER_EPOCH, 1, 0),  # on the last step of epoch 1: stops between two epochs
])
def test_signal_writes_a_checkpoint_and_resume_finishes_the_run(reference, tmp_path, sig, step,
                                                                 epoch, steps_in):
    """The stop lands at an exact step (the OCTCONV_EXP_SIGNAL_AT test hook sends the signal
    to the run itself after that step), so the checkpoint's progress is asserted exactly."""
    run_dir = tmp_path / "run"
    res = run_cli(*REFERENCE_RUN, "trainer.epochs=3", f"hydra.run.dir={run_dir}",
                  env={"OCTCONV_EXP_SIGNAL_AT": f"step:{step}", "OCTCONV_EXP_SIGNAL": sig})
    assert res.returncode == 128 + getattr(signal, sig), res.stderr[-3000:]
    last_line = res.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: interrupted by {sig} at epoch {epoch + 1}, step "
                                f"{steps_in}") and "resume=true" in last_line
    m = read_metrics(run_dir)
    assert m["status"] == "interrupted" and m["epochs_completed"] == epoch
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == epoch
    if steps_in:
        assert state["progress"]["steps"] == steps_in and state["progress"]["images"] == 8 * steps_in
    else:
        assert state["progress"] is None
    resumed = run_cli(*REFERENCE_RUN, "trainer.epochs=3", "resume=true",
                      f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{steps_in} step(s) into epoch {epoch + 1}" in resumed.stdout + resumed.stderr \
        or not steps_in
    got, ref = read_metrics(run_dir), read_metrics(reference)
    assert got["status"] == "completed"
    assert {k: got[k] for k in SAME} == {k: ref[k] for k in SAME}
    assert losses(run_dir) == losses(reference)
    # The record spans both attempts: it started with the first, and its wall time adds the
    # two attempts' (not the pause between them, which held a process start-up).
    assert got["started_at"] == m["started_at"] and got["started"] == m["started"]
    assert m["wall_seconds"] < got["wall_seconds"] < got["finished_at"] - got["started_at"]
    assert "reevaluated_at" not in got


USER_CODE = os.path.join(REPO, "tests", "user_code")
#: A model with dropout (tests/user_code/my_research.py) trained with Adam: after a resume,
#: the dropout masks come from torch's global generator (restored from the checkpoint) and
#: each step from Adam's moments (restored with the optimizer). 160 images: 20 steps an epoch.
DROPOUT = ["model._target_=my_research.DropNet", "model.name=dropnet", "optimizer=adam",
           "dataset=synthetic", "dataset.train_size=160", "dataset.test_size=100",
           "trainer.batch_size=8", "trainer.epochs=2", "trainer.progress_bar=false"]


@pytest.mark.slow
def test_resume_inside_an_epoch_with_dropout_and_adam_is_exact(tmp_path):
    """Stopped 7 steps into epoch 2 and resumed, the run repeats the uninterrupted one to the
    last bit: resume restores the global random generator (dropout), Adam's state and skips
    exactly the batches done. The shipped models draw nothing from the global generator
    during training (data order and augmentation have generators of their own), so this
    user model is what shows the generator's restore matters."""
    env = {"PYTHONPATH": USER_CODE}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = run_cli(*DROPOUT, f"hydra.run.dir={ref_dir}", env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    stopped = run_cli(*DROPOUT, f"hydra.run.dir={run_dir}",
                      env={**env, "OCTCONV_EXP_SIGNAL_AT": "step:27"})
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["progress"]["steps"] == 7
    assert state["optimizer"]["state"]  # Adam's moments were saved
    resumed = run_cli(*DROPOUT, "resume=true", f"hydra.run.dir={run_dir}", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "7 step(s) into epoch 2" in resumed.stdout + resumed.stderr
    assert epoch_rows(run_dir) == epoch_rows(ref_dir) and len(epoch_rows(ref_dir)) == 2
    got, want = read_metrics(run_dir), read_metrics(ref_dir)
    assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}
    final, final_ref = (torch.load(d / "model.pt", weights_only=True)["state_dict"]
                        for d in (run_dir, ref_dir))
    assert all(torch.equal(final[k], v) for k, v in final_ref.items())


#: Two epochs of 8 steps (64 images in batches of 8: "step:3" is inside epoch 1, before any
#: checkpoint), and two test batches of 80 ("evaluation", after the first, is inside it).
SHORT = [*SYNTHETIC_1200_OCTAVE, "dataset.train_size=64", "dataset.test_size=160",
         "trainer.epochs=2"]


@pytest.mark.slow
@pytest.mark.parametrize("at, status, line", [
    ("start-up", "interrupted", "interrupted by SIGINT at start-up; no checkpoint was written yet"),
    ("step:3*2", "interrupted", "interrupted by SIGINT (a second signal) during training; no "
                                "checkpoint"),
    ("evaluation", "interrupted", "interrupted by SIGINT during evaluation, after training had "
                                  "finished; checkpoint"),
    ("accuracy", "completed", None),
    ("accuracy*2", "interrupted", "interrupted by SIGINT (a second signal) while writing the "
                                  "finished run's outputs; checkpoint"),
])
def test_a_signal_anywhere_in_a_run_is_one_line_and_a_record(tmp_path, at, status, line):
    """Ctrl-C at start-up, a second Ctrl-C, Ctrl-C during evaluation and right after the final
    accuracy: never a traceback, metrics.json always says what happened, and a resume hint is
    given only when there is a checkpoint to resume (a finished one is re-evaluated)."""
    run_dir = tmp_path / "run"
    res = run_cli(*SHORT, f"hydra.run.dir={run_dir}", env={"OCTCONV_EXP_SIGNAL_AT": at})
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["status"] == status
    if line is None:  # finished: the outputs are written first, the signal is reported
        assert res.returncode == 0 and (run_dir / "model.pt").exists()
        assert "SIGINT received after the run finished" in res.stdout + res.stderr
        assert m["test_accuracy"] is not None and m["epochs_completed"] == 2
        return
    assert res.returncode == 130
    assert res.stderr.count("\n") == 1 and line in res.stderr
    assert m["error"] in res.stderr
    if "continue with: " in res.stderr:
        hint = res.stderr.strip().split("continue with: ", 1)[1]
        assert hint.startswith("python ") and "resume=true" in hint
        again = run_cli("resume=true", f"hydra.run.dir={run_dir}")
        assert again.returncode == 0, again.stderr[-2000:]
        assert read_metrics(run_dir)["status"] == "completed"


@pytest.mark.slow
def test_ctrl_c_under_joblib_checkpoints_the_running_jobs_and_records_the_rest(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the joblib workers' running jobs
    stop at a checkpoint, the job not started yet is recorded, the report names them all."""
    sweep_dir = tmp_path / "sweep"
    proc = start_joblib_sweep(sweep_dir, timeout=120)  # both held after their second step
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    steps_done = {}
    for conv in ("vanilla", "octave"):
        run_dir = sweep_dir / f"conv={conv}" / "seed=0"
        m = read_metrics(run_dir)
        assert m["status"] == "interrupted" and "continue with" in m["error"], m
        progress = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]
        assert progress["steps"] == 2  # stopped at the step it was at, inside the epoch (50)
        steps_done[conv] = progress["steps"]
    m = read_metrics(sweep_dir / "conv=multi-octave" / "seed=0")
    assert m["status"] == "interrupted" and m["error"].startswith("not started")
    assert "3 of 3 runs did not complete" in err
    resumed = run_cli("-m", "conv=vanilla,octave,multi-octave", "dataset=synthetic",
                      "dataset.train_size=400", "dataset.test_size=100", "trainer.epochs=1",
                      "trainer.progress_bar=false", "resume=true",
                      f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(read_metrics(sweep_dir / f"conv={c}" / "seed=0")["status"] == "completed"
               for c in ("vanilla", "octave", "multi-octave"))
    # The interrupted jobs continued from their checkpoints: each resumed inside epoch 1 at
    # the step it had reached, ran the rest of it only, and counts the epoch once, whole.
    for conv, steps in steps_done.items():
        run_dir = sweep_dir / f"conv={conv}" / "seed=0"
        attempts = (run_dir / "run.log").read_text().split("Resuming from ")
        assert len(attempts) == 2, conv
        assert f"0 epoch(s) done, {steps} step(s) into epoch 1" in attempts[1], attempts[1][:500]
        assert [r["train_images"] for r in epoch_rows(run_dir)] == ["400"]  # none twice
        assert read_metrics(run_dir)["epochs_completed"] == 1
    log = (sweep_dir / "conv=multi-octave" / "seed=0" / "run.log").read_text()
    assert "starting this job afresh" in log and "Resuming from" not in log


@pytest.mark.slow
def test_evaluate_only(reference, tmp_path):
    res = run_cli(*REFERENCE_RUN, "train=false", f"ckpt_path={reference}",
                  f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(tmp_path)
    assert m["status"] == "evaluated" and m["checkpoint"].endswith("model.pt")
    assert m["test_accuracy"] == read_metrics(reference)["test_accuracy"]
    assert m["test_samples"] == 300 and not (tmp_path / "model.pt").exists()


@pytest.mark.slow
def test_checkpoint_of_another_model_says_what_differs(reference, tmp_path):
    res = run_cli(*REFERENCE_RUN, "conv=vanilla", "train=false",
                  f"ckpt_path={reference}/checkpoints/best.pt", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "conv=octave" in res.stderr and "this run has conv=vanilla" in res.stderr
    res = run_cli(*REFERENCE_RUN, "alpha=0.5", "resume=true", f"ckpt_path={reference}",
                  f"hydra.run.dir={tmp_path / 'b'}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "trained with alpha=0.25; this command sets alpha=0.5" in res.stderr


@pytest.mark.slow
def test_resume_without_a_checkpoint(tmp_path):
    res = run_cli(*SYNTHETIC_1200_OCTAVE, "resume=true", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "no checkpoint in" in res.stderr


@pytest.mark.slow
def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = run_cli(*SYNTHETIC_1200_OCTAVE, "train=false", f"ckpt_path={bad}",
                  f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 2 and f"{bad} is corrupt" in res.stderr
    assert res.stderr.count("\n") == 1


@pytest.mark.slow
def test_divergence_stops_the_run(tmp_path):
    res = run_cli(*SYNTHETIC_1200_OCTAVE, "trainer.epochs=2", "optimizer.lr=1e30",
                  f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "training diverged: loss nan at epoch 1, step" in res.stderr
    assert read_metrics(tmp_path)["status"] == "diverged"


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_other_metrics(reference, tmp_path):
    again = tmp_path / "again"
    res = run_cli(*REFERENCE_RUN, "trainer.epochs=3", f"hydra.run.dir={again}")
    assert res.returncode == 0
    got, want = read_metrics(again), read_metrics(reference)
    assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}
    assert losses(again) == losses(reference)
    other = tmp_path / "other"
    # Another seed: another first epoch already (one epoch is enough to tell).
    res = run_cli(*REFERENCE_RUN, "trainer.epochs=1", "seed=1", "deterministic=true",
                  f"hydra.run.dir={other}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert losses(other)[0] != losses(reference)[0]


@pytest.mark.slow
def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = run_cli(*SYNTHETIC_1200_OCTAVE, f"hydra.run.dir={blocker}/run")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "cannot create the output dir" in res.stderr and "is not a directory" in res.stderr
    assert blocker.read_text() == ""  # nothing lost


# ------------------------------------------------------------------------------ validate


def run_validate(*args):
    return run_python("-m", "octconv_exp.validate", "-q", *args)


@pytest.mark.slow
def test_validate_accepts_every_shipped_config():
    res = run_python("-m", "octconv_exp.validate")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    checked = int(res.stdout.strip().splitlines()[-1].split()[0])
    # every group combination (conv, optimizer, scheduler, dataset, ipu), each model in each
    # conv mode, each logger and search option, and every preset
    assert checked == 3 * 5 * 4 * 4 * 1 + 3 * 3 + 3 + 2 + 9


@pytest.mark.slow
def test_validate_reports_one_line_per_invalid_config(tmp_path):
    extra = tmp_path / "mine"
    (extra / "experiment").mkdir(parents=True)
    (extra / "experiment" / "too_wide.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /conv: octave\nalpha: 0.99\n")
    (extra / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  epoch: 3\n")
    (extra / "experiment" / "fine.yaml").write_text("# @package _global_\ntrainer:\n  epochs: 3\n")
    # What composition would skip or choke on: one line per file, and the rest still checked.
    (extra / "experiment" / "broken.yaml").write_text("# @package _global_\ntrainer: [open\n")
    (extra / "experiment" / "short.yml").write_text("# @package _global_\nalpha: 0.25\n")
    (extra / "optimisers").mkdir()
    (extra / "optimisers" / "adam2.yaml").write_text("name: adam\n")
    (extra / "notes.txt").write_text("not config")
    # --only-added: the three presets of the folder, not the shipped configurations again.
    res = run_validate("--config-dir", str(extra), "--only-added")
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 6, lines
    assert any(line.startswith("invalid: experiment=too_wide: alpha=0.99") for line in lines)
    # run.py's message: one line, with its did-you-mean and the file that set it.
    assert ("invalid: experiment=typo: trainer.epoch: Key 'epoch' not in 'TrainerConfig'; did you "
            "mean trainer.epochs? (set in experiment/typo)") in lines
    assert any("broken.yaml: YAML syntax error at line 3" in line for line in lines)
    assert any("short.yml: not read (only .yaml files" in line for line in lines)
    assert any("optimisers: a folder octconv-exp does not read; did you mean optimizer/?" in line
               for line in lines)
    assert any("notes.txt: not read" in line for line in lines)


@pytest.mark.slow
def test_validate_checks_every_value_of_a_presets_sweep_and_search_space(tmp_path):
    mine = tmp_path / "my_experiments"
    (mine / "experiment").mkdir(parents=True)
    head = "# @package _global_\ndefaults:\n  - override /conv: octave\n"
    (mine / "experiment" / "my_sweep.yaml").write_text(
        head + "hydra:\n  sweeper:\n    params:\n      alpha: 0.25,0.5,0.97\n")
    (mine / "experiment" / "my_search.yaml").write_text(
        head + "  - override /search: optuna\nhydra:\n  sweeper:\n    params:\n"
        "      alpha: interval(0.1, 0.99)\n      expansion: choice(1, 2)\n")
    (mine / "experiment" / "fine_search.yaml").write_text(
        head + "  - override /search: optuna\nhydra:\n  sweeper:\n    params:\n"
        "      alpha: interval(0.1, 0.5)\n      expansion: range(1, 3)\n")
    res = run_validate("--config-dir", str(mine), "--only-added")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    # Before: all three passed, and the sweep's third job failed when it ran.
    assert lines == [
        "invalid: experiment=my_search swept to alpha=0.99 expansion=1: alpha=0.99: splits a "
        "16-channel layer into 0 high- and 16 low-frequency channels at expansion=1; both must "
        "be > 0 (use a smaller alpha, a larger expansion, or alpha=0)",
        "invalid: experiment=my_search swept to alpha=0.99 expansion=2: alpha=0.99: splits a "
        "32-channel layer into 0 high- and 32 low-frequency channels at expansion=2; both must "
        "be > 0 (use a smaller alpha, a larger expansion, or alpha=0)",
        "invalid: experiment=my_sweep swept to alpha=0.97: alpha=0.97: splits a 16-channel layer "
        "into 0 high- and 16 low-frequency channels at expansion=1; both must be > 0 (use a "
        "smaller alpha, a larger expansion, or alpha=0)"], lines


MARKER_PRESET = """# @package _global_
model:
  _target_: os.system
  command: touch {marker}
"""


@pytest.mark.slow
def test_validate_runs_no_code_of_a_preset_without_trust_code(tmp_path):
    mine = tmp_path / "contributed"
    (mine / "experiment").mkdir(parents=True)
    marker = tmp_path / "marker"
    (mine / "experiment" / "touches.yaml").write_text(MARKER_PRESET.format(marker=marker))
    res = run_python("-m", "octconv_exp.validate", "--config-dir", str(mine), "--only-added")
    assert not marker.exists()  # before: validate built the model, running the preset's code
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout.splitlines() == [
        "not validated: model._target_=os.system (experiment=touches): code from outside "
        "octconv-exp is not imported or run without --trust-code; the rest of the configuration "
        "is valid",
        "1 configurations checked, 0 invalid, 1 not validated (--trust-code)"]
    # Asked to, it runs the code: the model is built (and refused: os.system returns no model).
    res = run_validate("--config-dir", str(mine), "--only-added", "--trust-code")
    assert marker.exists()
    assert res.returncode == 1 and "returned a int, not a torch.nn.Module" in res.stdout


@pytest.mark.slow
def test_validate_a_binary_preset_is_one_line(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "blob.yaml").write_bytes(b"\xff\xfe\x00\x81\x80binary")
    res = run_validate("--config-dir", str(tmp_path), "--only-added")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == (f"error: {tmp_path}/experiment/blob.yaml: not a YAML text file (not "
                          "UTF-8: byte 0 cannot be decoded); remove it or save it as UTF-8\n")


@pytest.mark.slow
def test_validate_a_config_dir_of_its_own(tmp_path):
    import shutil

    own = tmp_path / "conf"
    shutil.copytree(os.path.join(REPO, "conf"), own)
    # Fewer options than ours (the product stays small): three schedulers, two data sets, one
    # optimizer and one preset (each preset's sweep is validated value by value: ours would be
    # most of this test's time).
    for name in ("scheduler/cosine.yaml", "dataset/custom.yaml", "dataset/image_folder.yaml",
                 "optimizer/adam.yaml", "optimizer/adamw.yaml", "optimizer/lamb.yaml",
                 "optimizer/rmsprop.yaml"):
        os.remove(own / name)
    for preset in os.listdir(own / "experiment"):
        if preset != "smoke.yaml":
            os.remove(own / "experiment" / preset)
    (own / "optimizer" / "broken.yaml").write_text("name: sgd\n_target_: torch.optim.SGD\nlr: -1\n")
    res = run_validate("--config-dir", str(own), "--only-added")  # not ours again
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert lines and all("optimizer=broken" in line and "optimizer.lr=-1" in line for line in lines)
    assert len(lines) == 3 * 3 * 2 * 1  # every combination with the broken optimizer


@pytest.mark.slow
def test_a_sweep_resumes_job_by_job(tmp_path):
    sweep_dir = tmp_path / "s"
    kept = [a for a in SYNTHETIC_1200_OCTAVE if not a.startswith(("alpha=", "dataset.train_size="))]
    args = ["-m", *kept, "alpha=0.25,0.5", "dataset.train_size=64", "trainer.epochs=2",
            f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    finished = sweep_dir / "alpha=0.25" / "seed=0"
    done = read_metrics(finished)
    before = {name: (finished / name).read_bytes()
              for name in ("epochs.csv", os.path.join("checkpoints", "last.pt"))}
    import shutil

    shutil.rmtree(sweep_dir / "alpha=0.5")  # a job that never ran
    again = run_cli(*args, "resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    # The finished job was re-evaluated, not retrained: no epoch ran (a retrained epoch
    # would log itself and rewrite epochs.csv, whose train_seconds differ from run to run,
    # and last.pt), and the same weights gave the same accuracy.
    m = read_metrics(finished)
    assert m["status"] == "completed" and m["test_accuracy"] == done["test_accuracy"]
    assert m["epochs_completed"] == 2 and m["train_seconds"] == done["train_seconds"]
    assert {name: (finished / name).read_bytes() for name in before} == before
    attempts = (finished / "run.log").read_text().split("Resuming from ")
    assert len(attempts) == 2 and "2 epoch(s) done" in attempts[1]
    assert "Epoch 1/2" in attempts[0] and "Epoch " not in attempts[1]
    assert "Accuracy on test set" in attempts[1]
    # Its record still times its training (the re-evaluation took a fraction of a second and
    # once made the report's wall time smaller than the training time); the re-evaluation is
    # recorded beside it.
    timing = ("wall_seconds", "started_at", "finished_at", "started", "finished")
    assert {k: m[k] for k in timing} == {k: done[k] for k in timing}
    assert m["wall_seconds"] >= m["train_seconds"] > 0
    assert m["reevaluation_seconds"] > 0 and m["reevaluated_at"] >= m["finished"]
    assert "reevaluated_at" not in done
    with open(sweep_dir / "summary.csv") as f:
        rows = {r["run_dir"]: r for r in csv.DictReader(f)}
    assert float(rows[os.path.join("alpha=0.25", "seed=0")]["wall_seconds"]) == done["wall_seconds"]
    fresh = sweep_dir / "alpha=0.5" / "seed=0"
    fresh_metrics = read_metrics(fresh)
    assert fresh_metrics["status"] == "completed" and fresh_metrics["epochs_completed"] == 2
    assert "starting this job afresh" in (fresh / "run.log").read_text()


def test_validate_in_parallel_reports_the_same_lines_in_the_same_order():
    from octconv_exp.config import schema as config  # noqa: F401  (schema)
    from octconv_exp.config.presets import CONFIG_DIR, CONFIG_NAME
    from octconv_exp.cli.validate import check_all

    combos = [(f"alpha={a} conv={c}", [f"alpha={a}", f"conv={c}"])
              for c in ("octave", "vanilla") for a in (0.25, 0.99, 1.5, 0.5, 0.97)]
    combos += [("lr", ["optimizer.lr=-1"]), ("fine", [])] * 4
    serial = check_all(combos, CONFIG_DIR, CONFIG_NAME, [], [], jobs=1)
    parallel = check_all(combos, CONFIG_DIR, CONFIG_NAME, [], [], jobs=2)
    assert parallel == serial
    assert [label for _, label, _ in serial] == [
        "alpha=0.99 conv=octave", "alpha=1.5 conv=octave", "alpha=0.97 conv=octave",
        "alpha=1.5 conv=vanilla", "lr", "lr", "lr", "lr"]


# ------------------------------------------------------------------------------ the run dir as its own record


def _pwn_file(path, marker):
    """A 'checkpoint' whose unpickling runs a command (creates ``marker``)."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "conv": "octave", "payload": Evil()}, path)


@pytest.mark.slow
@pytest.mark.sdk
def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    _pwn_file(evil, marker)
    for args in (["train=false", f"ckpt_path={evil}"], ["resume=true", f"ckpt_path={evil}"]):
        res = run_cli(*SYNTHETIC_1200_OCTAVE, *args, f"hydra.run.dir={tmp_path / 'r'}")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert "refusing to load" in res.stderr and "arbitrary-code" in res.stderr
        assert not marker.exists()


@pytest.mark.slow
def test_a_damaged_last_checkpoint_names_best(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk outside our writes
    before = (run_dir / "metrics.json").read_bytes()
    res = run_cli("resume=true", "trainer.epochs=4", f"hydra.run.dir={run_dir}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "is truncated or corrupt" in res.stderr
    best = run_dir / "checkpoints" / "best.pt"
    assert f"ckpt_path={best}" in res.stderr
    assert (run_dir / "metrics.json").read_bytes() == before
    # The way back it names works.
    res = run_cli("resume=true", "trainer.epochs=4", f"ckpt_path={best}",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert read_metrics(run_dir)["epochs_completed"] == 4


@pytest.mark.slow
def test_resume_takes_the_runs_own_config_and_refuses_other_results(reference, tmp_path):
    """The hint's command (resume=true and the run dir, nothing else) continues the run as it
    was made; an override that would change its results is refused naming each key, and a
    refused resume leaves metrics.json, epochs.csv and .hydra/ as they were."""
    import shutil

    run_dir = tmp_path / "sweep" / "conv=octave,alpha=0.25 x" / "seed=0"  # = , and a space
    shutil.copytree(reference, run_dir)
    record = {p: p.read_bytes() for p in [run_dir / "metrics.json", run_dir / "epochs.csv",
                                          *sorted((run_dir / ".hydra").glob("*.yaml"))]}
    for args, keys in ((["optimizer.lr=0.1", "trainer.batch_size=16"],
                        ["optimizer.lr=0.1", "trainer.batch_size=16"]),
                       (["optimizer=adam"], ["optimizer=adam"]),
                       (["dataset.train_size=600"], ["dataset.train_size=600"]),
                       (["conv=vanilla", "seed=3"], ["conv=vanilla", "seed=3"])):
        res = run_cli("resume=true", "trainer.epochs=4", *args, f"hydra.run.dir={run_dir}")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert "would change its results" in res.stderr
        for key in keys:
            assert key in res.stderr
        for path, content in record.items():
            assert path.read_bytes() == content, path
    # Unquoted as copied from a summary (= and ,), only what a resume may change.
    res = run_cli("resume=true", "trainer.epochs=4", "logger=csv", "trainer.progress_bar=false",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-2000:]
    m = read_metrics(run_dir)
    assert (m["status"], m["conv"], m["alpha"], m["dataset"], m["epochs"],
            m["epochs_completed"]) == ("completed", "octave", 0.25, "synthetic", 4, 4)
    assert losses(run_dir)[:3] == losses(reference)
    assert "epochs: 4" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == record[run_dir / ".hydra" / "overrides.yaml"]
    assert list((run_dir / ".hydra" / "attempts").iterdir())  # the attempts' own files


@pytest.mark.slow
def test_the_interrupt_hint_is_a_command_that_works(tmp_path):
    run_dir = tmp_path / "a dir" / "conv=octave,alpha=0.25" / "seed=0"
    args = [*SYNTHETIC_1200_OCTAVE, "dataset.train_size=64", "trainer.epochs=2"]
    # SIGINT after step 12 of 16, inside epoch 2 (the test hook: no race with a timer).
    proc = run_cli(*args, f"hydra.run.dir='{run_dir}'", cwd=str(tmp_path), timeout=300,
                   env={"OCTCONV_EXP_SIGNAL_AT": "step:12"})
    err = proc.stderr
    assert proc.returncode == 130, err[-2000:]
    hint = err.strip().splitlines()[-1].split("continue with: ", 1)[1]
    import shlex

    argv = shlex.split(hint)
    assert argv[:3] == ["python", os.path.join(REPO, "run.py"), "resume=true"]
    res = run_python(*argv[1:], cwd=str(tmp_path), timeout=300)  # python ARGV, as pasted
    assert res.returncode == 0, res.stderr[-2000:]
    m = read_metrics(run_dir)
    assert (m["status"], m["conv"], m["dataset"], m["epochs_completed"]) == (
        "completed", "octave", "synthetic", 2)


@pytest.mark.slow
def test_an_interrupted_sweep_ends_with_the_command_that_continues_the_whole_sweep(tmp_path):
    """A sequential sweep stopped inside its first job: each job's line names that job; the
    last line continues the sweep (all its values, resume=true, its dir), pasted as it is."""
    import shlex

    sweep_dir = tmp_path / "my sweeps" / "a=b"
    overrides = ["conv=vanilla,octave", "alpha=0.25", "dataset=synthetic",
                 "dataset.train_size=400", "dataset.test_size=50", "trainer.epochs=1",
                 "trainer.progress_bar=false", "logger=[csv]", SWEEP_FIGURES, CONFUSION_FIGURES]
    proc = run_cli("-m", *overrides, f"hydra.sweep.dir='{sweep_dir}'", cwd=str(tmp_path),
                   timeout=300, env={"OCTCONV_EXP_SIGNAL_AT": "step:20"})
    assert proc.returncode == 130, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "conv=vanilla/seed=0: interrupted by SIGINT at epoch 1, step 20" in lines[0]
    assert lines[-1].startswith("error: the sweep was interrupted by SIGINT; continue it with: ")
    argv = shlex.split(lines[-1].split("continue it with: ", 1)[1])
    assert argv[:3] == ["python", os.path.join(REPO, "run.py"), "-m"]
    assert argv[3:] == overrides + ["resume=true", f'hydra.sweep.dir="{sweep_dir}"']
    job = sweep_dir / "conv=vanilla" / "seed=0"
    assert read_metrics(job)["status"] == "interrupted"
    assert read_metrics(sweep_dir / "conv=octave,alpha=0.25" / "seed=0")["status"] == "interrupted"
    res = run_python(*argv[1:], cwd=str(tmp_path), timeout=300)  # python ARGV, as pasted
    assert res.returncode == 0, res.stderr[-2000:]
    for run_dir in (job, sweep_dir / "conv=octave,alpha=0.25" / "seed=0"):
        assert read_metrics(run_dir)["status"] == "completed"
    assert "0 epoch(s) done, 20 step(s) into epoch 1" in (job / "run.log").read_text()


def test_the_sweep_resume_hint_replaces_resume_sweep_dir_and_attempt_subdir():
    from octconv_exp.training.resume import sweep_resume_hint

    import shlex

    argv = ["-m", "conv=vanilla,octave", "alpha=interval(0.1,0.9)", "resume=false",
            "hydra.sweep.dir=old", "hydra.output_subdir=.hydra/attempts/20260101-000000-1",
            "dataset.root=\"/data/my set\""]
    hint = shlex.split(sweep_resume_hint(argv, "/s w/x=1"))
    assert hint[2:] == ["-m", "conv=vanilla,octave", "alpha=interval(0.1,0.9)",
                        "dataset.root=\"/data/my set\"", "resume=true",
                        'hydra.sweep.dir="/s w/x=1"']
    search = shlex.split(sweep_resume_hint(["-m", "experiment=alpha_search"], "/s", search=True))
    assert search[2:] == ["-m", "experiment=alpha_search", 'hydra.sweep.dir="/s"']


@pytest.mark.slow
def test_evaluation_takes_model_and_data_from_the_checkpoint(reference, tmp_path):
    res = run_cli("train=false", f"ckpt_path={reference}", "trainer.progress_bar=false",
                  f"hydra.run.dir={tmp_path / 'e'}")
    assert res.returncode == 0, res.stderr[-2000:]
    m = read_metrics(tmp_path / "e")
    assert (m["status"], m["conv"], m["alpha"], m["dataset"], m["epochs"]) == (
        "evaluated", "octave", 0.25, "synthetic", 3)
    assert m["test_accuracy"] == read_metrics(reference)["test_accuracy"]
    assert "synthetic" in (tmp_path / "e" / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_one_writer_per_run_dir(tmp_path):
    """A second run into a live run's dir is refused before it writes anything; a lock left
    by a dead run is taken over, and the temp files a killed run left are removed."""
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": sleeper.pid,
                                                   "host": socket.gethostname(),
                                                   "started": time.time()}))
        res = run_cli(*SYNTHETIC_1200_OCTAVE, "dataset.train_size=64", "trainer.epochs=1",
                      f"hydra.run.dir={run_dir}")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert f"pid {sleeper.pid}" in res.stderr and "being written by another run" in res.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    (run_dir / ".metrics.json.abc123").write_text("{half")  # a kill -9 between write and rename
    res = run_cli(*SYNTHETIC_1200_OCTAVE, "dataset.train_size=64", "trainer.epochs=1",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Taking over" in res.stdout + res.stderr
    assert not (run_dir / ".lock").exists() and not (run_dir / ".metrics.json.abc123").exists()
    assert read_metrics(run_dir)["status"] == "completed"


def test_the_lock_refuses_a_live_holder_in_process(tmp_path):
    from octconv_exp.training.rundir import RunDirBusy, RunDirLock

    with RunDirLock(str(tmp_path)) as lock:
        assert lock.held and (tmp_path / ".lock").exists()
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        # Another process holding it: refused.
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            holder["pid"] = other.pid
            (tmp_path / ".lock").write_text(json.dumps(holder))
            with pytest.raises(RunDirBusy, match=f"pid {other.pid}"):
                with RunDirLock(str(tmp_path)):
                    pass
        finally:
            other.kill()
            other.wait()
    assert (tmp_path / ".lock").exists()  # not ours any more when we left: left in place


@pytest.mark.slow
def test_disk_full_and_a_file_in_the_way_are_one_line(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(tiny)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            res = run_cli(*SYNTHETIC_1200_OCTAVE, "dataset.train_size=64", "expansion=2",
                          "trainer.epochs=2", f"hydra.run.dir={tiny / 'run'}")
            assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
            assert "no space left on device" in res.stderr
            assert not [p for p in (tiny / "run" / "checkpoints").iterdir()
                        if p.name.startswith(".")]  # no temp file left behind
    finally:
        if mounted:
            subprocess.run(["umount", str(tiny)], capture_output=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    res = run_cli(*SYNTHETIC_1200_OCTAVE, "dataset.train_size=64", "trainer.epochs=1",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "is a file, and checkpoints need a folder" in res.stderr
    assert read_metrics(run_dir)["status"] == "failed"
    if not mounted:
        pytest.skip("no tmpfs mount here (not root): the disk-full half was not run")


@pytest.mark.slow
def test_a_run_dir_path_too_long_is_refused_before_anything_is_written(tmp_path):
    long_name = tmp_path / ("x" * 300)
    res = run_cli("dataset=synthetic", f"hydra.run.dir={long_name}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "is 300 bytes long, and this file system takes 255 at most" in res.stderr
    deep = tmp_path.joinpath(*["d" * 250] * 16)
    res = run_cli("-m", "dataset=synthetic", f"hydra.sweep.dir={deep}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "limit of 4096" in res.stderr and "hydra.sweep.dir" in res.stderr
    assert os.listdir(tmp_path) == []


def test_job_names_of_a_sweep_over_many_keys_fit_a_file_name():
    from octconv_exp.config.resolvers import MAX_NAME_BYTES, config_name

    overrides = [f"optimizer.some_rather_long_argument_name_{i}={i / 7:.6f}" for i in range(12)]
    name = config_name(overrides)
    assert len(name.encode()) <= MAX_NAME_BYTES and name.startswith("optimizer.some_rather")
    other = config_name(overrides[:-1] + ["optimizer.some_rather_long_argument_name_11=0"])
    assert other != name and len(other.encode()) <= MAX_NAME_BYTES
    assert config_name(["alpha=0.25", "conv=octave"]) == "conv=octave,alpha=0.25"


def test_a_model_that_cannot_fit_in_gpu_memory_is_refused_before_allocating(monkeypatch):
    """On CUDA the estimate is compared with the GPU's free memory (no GPU here: torch.cuda is
    faked; the host check passes)."""
    from hydra import compose, initialize_config_dir

    from octconv_exp.config import schema as config_module
    from octconv_exp.errors import ConfigError

    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(REPO, "conf")):
        cfg = compose(config_name="config", overrides=["dataset=synthetic", "device=cuda",
                                                       "model=resnet_imagenet"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2**30, 80 * 2**30))
    need = config_module.check_model(cfg)  # ResNet-50, 10 classes: 23.5 M parameters x 16 bytes
    assert 23e6 * 16 < need < 24e6 * 16
    with pytest.raises(ConfigError, match=r"model=resnet_imagenet: needs at least 1\.\d GiB of "
                                          r"GPU memory .* the GPU has 1\.0 GiB free"):
        config_module.check_model_fits_in_memory(
            config_module.OmegaConf.merge(cfg, {"model": {"width": 2}}))
    config_module.check_model_fits_in_memory(cfg)  # 0.4 GiB of 1 GiB: fits


@pytest.mark.slow
def test_evaluating_into_a_training_run_dir_is_refused_and_changes_nothing(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = (run_dir / "metrics.json").read_bytes()
    res = run_cli("train=false", f"ckpt_path={run_dir}", f"hydra.run.dir={run_dir}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "holds a training run's record (metrics.json status completed)" in res.stderr
    assert (run_dir / "metrics.json").read_bytes() == before


#: run.py as a process that lingers 4 s at exit, after its error line (as a torchrun rank does
#: while it leaves its process group), so that a signal can arrive then.
LINGERING_RUN = """
import atexit, runpy, sys, time
atexit.register(time.sleep, 4)  # registered first, so it runs after run.py's own exit handlers
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.sdk
def test_a_signal_while_a_failed_run_exits_adds_no_second_line(tmp_path):
    """torchrun SIGTERMs the ranks left when one fails: a rank that has already printed its
    error line must not add "interrupted ... outside a run" (and keeps its exit status)."""
    proc = subprocess.Popen([sys.executable, "-c", LINGERING_RUN, os.path.join(REPO, "run.py"),
                             "trainer.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    assert first.startswith("error: trainer.batch_size=0"), first
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 2
    assert "error:" not in rest and "Traceback" not in rest, rest
