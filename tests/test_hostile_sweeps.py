"""Hostile inputs to sweeps and searches (issue 25, round three): command lines Hydra's
grammar refuses, a report that cannot be written, a resumed sweep that would change its jobs,
two searches in one sweep dir, interrupted searches, and SIGTERM to a joblib sweep's own
process. Each ends in one line and a non-zero exit, and leaves what was recorded as it was."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli

TINY = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32", "trainer.epochs=1",
        "trainer.batch_size=16", "trainer.progress_bar=false"]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def snapshot(root):
    """Every file below ``root`` with its bytes: what a refused command must leave as it was."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


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
    """The command the grammar error suggests is one Hydra takes: the run dir is the path."""
    res = run_cli("dataset=synthetic", "trainer.epochs=0", "hydra.run.dir=runs/x(1)",
                  cwd=str(tmp_path))
    quoted = res.stderr.split("write it as ")[1].strip()
    import shlex

    (override,) = shlex.split(quoted)
    res = run_cli("dataset=synthetic", "trainer.epochs=0", override, cwd=str(tmp_path))
    # Parsed, composed and validated: what is left is the value the test set to fail.
    assert res.returncode == 2 and res.stderr == "error: trainer.epochs=0: must be an integer >= 1\n"


# ------------------------------------------------------------------ the sweep report


@pytest.mark.slow
def test_a_report_that_cannot_be_written_fails_the_sweep_in_one_line(tmp_path):
    sweep_dir = tmp_path / "s"
    (sweep_dir / "summary.md").mkdir(parents=True)  # a folder where the report goes
    res = run_cli("-m", *TINY, f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.splitlines()[-1] == (
        f"error: sweep report: cannot write {sweep_dir}/summary.md: is a directory; the "
        "previous version, if any, is intact")
    assert "Traceback" not in res.stderr and "warn" not in res.stderr.lower()
