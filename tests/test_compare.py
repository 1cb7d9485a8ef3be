"""Comparing runs (python -m octconv_exp.compare) and the code version metrics.json records.

Hand-written run dirs for the rules (fast), two real tiny runs for the whole path (slow), and
temp git repositories for the commit and dirty flag."""
import csv
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import yaml

from conftest import (CONFUSION_FIGURES, REPO, SYNTHETIC_32_TWO_EPOCHS_NO_SAVES, run_cli,
                      run_python)
from octconv_exp.records import provenance
from octconv_exp.reports import compare

EPOCH_HEADER = "epoch,train_loss,train_accuracy,train_images,train_seconds," \
               "train_images_per_second,lr,val_loss,val_accuracy\n"


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; asserts the file is a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def expected_png_size():
    w, h = compare.FIGURE_SIZE_IN
    return round(w * compare.FIGURE_DPI), round(h * compare.FIGURE_DPI)


def config(lr=0.05, conv="vanilla", **extra):
    cfg = {"alpha": 0.5, "seed": 0, "conv": {"mode": conv},
           "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.0},
           "scheduler": {"name": "cosine", "T_max": "${trainer.epochs}"},
           "trainer": {"epochs": 2, "batch_size": 16}}
    cfg.update(extra)
    return cfg


def make_run(path, metrics=None, cfg=None, epochs=None):
    """A run dir as run.py leaves it: .hydra/config.yaml, metrics.json, epochs.csv."""
    os.makedirs(os.path.join(str(path), ".hydra"), exist_ok=True)
    if cfg is not None:
        with open(os.path.join(str(path), ".hydra", "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
    if metrics is not None:
        with open(os.path.join(str(path), "metrics.json"), "w") as f:
            json.dump(metrics, f)
    if epochs is not None:
        with open(os.path.join(str(path), "epochs.csv"), "w") as f:
            f.write(EPOCH_HEADER + "".join(
                f"{i + 1},{loss},{acc},32,0.1,320,0.05,{loss + 0.1},{acc - 5}\n"
                for i, (loss, acc) in enumerate(epochs)))
    return str(path)


def finished(acc=50.0, loss=1.5, **extra):
    m = {"status": "completed", "epochs_completed": 2, "test_accuracy": acc, "train_loss": loss,
         "test_epoch": 2, "params": 12346, "val_accuracy": None,
         "code_version": {"commit": "ab" * 20, "dirty": False},
         "versions": {"python": "3.11.7", "torch": "2.14.1"}}
    m.update(extra)
    return m


def read_table(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    return rows[0], {(r[0], r[1]): r[2:] for r in rows[1:]}


def only_error(capsys, argv):
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------ the tables


def test_differing_keys_are_exactly_those_that_differ(tmp_path, capsys):
    """lr differs; momentum only one run has; T_max is an interpolation of trainer.epochs
    (which differs) and is not listed on its own; the rest agrees."""
    a = make_run(tmp_path / "a", finished(acc=40.0), config(lr=0.05), [(2.0, 20), (1.5, 30)])
    b_cfg = config(lr=0.1, trainer={"epochs": 3, "batch_size": 16})
    del b_cfg["optimizer"]["momentum"]
    b = make_run(tmp_path / "b", finished(acc=55.5, loss=1.25), b_cfg,
                 [(2.1, 15), (1.6, 25), (1.2, 40)])
    out = tmp_path / "out"
    assert compare.main([a, b, "--out", str(out)]) == 0
    header, table = read_table(out / "compare.csv")
    assert header == ["section", "key", "a", "b"]
    assert [k for s, k in table if s == "config"] == [
        "optimizer.lr", "optimizer.momentum", "trainer.epochs"]
    assert table[("config", "optimizer.lr")] == ["0.05", "0.1"]
    assert table[("config", "optimizer.momentum")] == ["0.0", ""]
    assert table[("metrics", "test_accuracy")] == ["40.0", "55.5"]
    assert table[("metrics", "train_loss")] == ["1.5", "1.25"]
    assert table[("metrics", "status")] == ["completed", "completed"]
    assert ("metrics", "val_accuracy") not in table  # no run has it
    assert ("metrics", "versions.torch") not in table  # the same in both
    assert table[("metrics", "code_version.commit")] == ["ab" * 20] * 2
    printed = capsys.readouterr().out
    assert "Config keys that differ (3):" in printed
    assert "optimizer.lr" in printed and "T_max" not in printed
    md = (out / "compare.md").read_text()
    assert "| `optimizer.lr` | 0.05 | 0.1 |" in md and "![learning curves](compare.png)" in md
    assert png_size(out / "compare.png") == expected_png_size()
    assert (out / "compare.pdf").read_bytes()[:5] == b"%PDF-"


def test_package_versions_are_listed_where_they_differ(tmp_path):
    a = make_run(tmp_path / "a", finished(), config())
    b = make_run(tmp_path / "b", finished(versions={"python": "3.8.18", "torch": "2.14.1"}),
                 config())
    runs, rows, _ = compare.compare([a, b], str(tmp_path / "o"), make_figure=False)
    assert {k: v for s, k, v in rows if k.startswith("versions.")} == {
        "versions.python": ["3.11.7", "3.8.18"]}
    assert [k for s, k, v in rows if s == "config"] == []


def test_metrics_a_newer_run_records_are_shown_by_their_name(tmp_path):
    """Top-5 and loss fields join the headline ones; other numbers (an epoch count named like
    'stop') do not."""
    a = make_run(tmp_path / "a", finished(test_loss=1.1, test_top5=90.0, stop_epochs=3),
                 config())
    b = make_run(tmp_path / "b", finished(), config())
    _, rows, _ = compare.compare([a, b], str(tmp_path / "o"), make_figure=False)
    keys = [k for s, k, v in rows if s == "metrics"]
    assert keys == ["status", "epochs_completed", "test_accuracy", "test_loss", "train_loss",
                    "test_epoch", "params", "test_top5", "code_version.commit",
                    "code_version.dirty"]
    assert dict((k, v) for s, k, v in rows)["test_top5"] == [90.0, None]


def test_a_sweep_dir_stands_for_its_runs_labelled_by_their_dir_names(tmp_path):
    sweep = tmp_path / "sweep"
    make_run(sweep / "conv=vanilla" / "seed=0", finished(acc=41.0), config(),
             [(2.0, 20)])
    make_run(sweep / "conv=octave" / "seed=0", finished(acc=42.0), config(conv="octave"),
             [(2.0, 20)])
    (sweep / "summary.csv").write_text("not a run\n")
    os.makedirs(sweep / "conv=octave" / "seed=0" / "checkpoints")
    single = make_run(tmp_path / "seed=0", finished(acc=43.0), config(lr=0.2))
    runs, rows, _ = compare.compare([str(sweep), single], str(tmp_path / "o"),
                                    make_figure=False)
    assert [r.label for r in runs] == ["conv=octave/seed=0", "conv=vanilla/seed=0",
                                       str(tmp_path.name) + "/seed=0"]
    table = {k: v for s, k, v in rows}
    assert table["test_accuracy"] == [42.0, 41.0, 43.0]
    assert table["conv.mode"] == ["octave", "vanilla", "vanilla"]
    assert table["optimizer.lr"] == [0.05, 0.05, 0.2]


def test_a_run_named_twice_counts_once(tmp_path, capsys):
    a = make_run(tmp_path / "a", finished(), config())
    line = only_error(capsys, [a, str(tmp_path / "a" / "."), "--out", str(tmp_path / "o")])
    assert "give two or more runs" in line


def test_a_live_run_is_shown_as_running_with_its_epochs_so_far(tmp_path):
    """Its lock held by a live process and no metrics.json yet: 'running', its curve drawn;
    a job of a sweep that died without metrics.json: 'missing'."""
    sweep = tmp_path / "sweep"
    done = make_run(sweep / "done", finished(), config())
    live = make_run(sweep / "live", None, config(lr=0.1), [(2.0, 20)])
    make_run(sweep / "dead", None, config(lr=0.3))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(live, ".lock"), "w") as f:
            json.dump({"pid": holder.pid, "host": os.uname().nodename, "started": 0}, f)
        out = tmp_path / "o"
        runs, rows, _ = compare.compare([str(sweep)], str(out))
        assert {r.label: r.status for r in runs} == {
            "dead": "missing", "done": "completed", "live": "running"}
        assert dict((k, v) for s, k, v in rows)["status"] == ["missing", "completed", "running"]
        # The live run's own record, once it exists, is the previous attempt's (a resume).
        with open(os.path.join(live, "metrics.json"), "w") as f:
            json.dump(finished(status="interrupted"), f)
        runs, _, _ = compare.compare([done, live], str(out), make_figure=False)
        assert runs[1].status == "running (record so far: interrupted)"
    finally:
        holder.kill()
        holder.wait()
    legend = compare.curves_figure(runs).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["done", "live (running)"]
    assert png_size(out / "compare.png") == expected_png_size()


def test_out_may_name_the_figure_file(tmp_path):
    a = make_run(tmp_path / "a", finished(), config(), [(2.0, 20)])
    b = make_run(tmp_path / "b", finished(), config(lr=0.1), [(2.0, 20)])
    _, _, written = compare.compare([a, b], str(tmp_path / "figs" / "lr.png"))
    assert sorted(os.listdir(tmp_path / "figs")) == ["lr.csv", "lr.md", "lr.pdf", "lr.png"]
    assert len(written) == 4
    assert "![learning curves](lr.png)" in (tmp_path / "figs" / "lr.md").read_text()


# ------------------------------------------------------------------------------ errors


def test_paths_that_are_no_runs_are_one_line_and_exit_2(tmp_path, capsys):
    a = make_run(tmp_path / "a", finished(), config())
    out = ["--out", str(tmp_path / "o")]
    assert "no such directory" in only_error(capsys, [a, str(tmp_path / "nope"), *out])
    (tmp_path / "empty").mkdir()
    assert "not a run dir" in only_error(capsys, [a, str(tmp_path / "empty"), *out])
    no_record = make_run(tmp_path / "killed", None, config())
    assert f"{no_record}: no metrics.json" in only_error(capsys, [a, no_record, *out])
    assert not os.path.exists(tmp_path / "o" / "compare.csv")  # nothing written on an error


@pytest.mark.parametrize("text, says", [("{\"status\": \"compl", "not readable as JSON"),
                                        ("[1, 2]", "a JSON list, not an object"),
                                        ("\udcff", "not readable as JSON")])
def test_a_corrupt_metrics_json_is_one_line_and_exit_2(tmp_path, capsys, text, says):
    a = make_run(tmp_path / "a", finished(), config())
    b = make_run(tmp_path / "b", None, config())
    with open(os.path.join(b, "metrics.json"), "w", errors="surrogateescape") as f:
        f.write(text)
    line = only_error(capsys, [a, b, "--out", str(tmp_path / "o")])
    assert line.startswith(f"error: {os.path.join(b, 'metrics.json')}: {says}")


def test_a_config_is_data_a_python_tag_is_refused_not_run(tmp_path, capsys):
    a = make_run(tmp_path / "a", finished(), config())
    b = make_run(tmp_path / "b", finished(), None)
    marker = tmp_path / "ran"
    with open(os.path.join(b, ".hydra", "config.yaml"), "w") as f:
        f.write(f"alpha: !!python/object/apply:os.system ['touch {marker}']\n")
    line = only_error(capsys, [a, b, "--out", str(tmp_path / "o")])
    assert "config.yaml: not readable as YAML" in line
    assert not marker.exists()


def test_the_command_exits_2_with_one_line(tmp_path):
    a = make_run(tmp_path / "a", finished(), config())
    res = run_python("-m", "octconv_exp.compare", a, str(tmp_path / "x"), timeout=120)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"error: {tmp_path / 'x'}: no such directory (give run "
                                       "dirs or sweep dirs)"]
    assert res.stdout == ""


# ------------------------------------------------------------------------------ code version


def git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A git repository whose package folder (pkg/) is tracked, one commit."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("x = 1\n")
    (repo / "README").write_text("r\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "one")
    return repo


def test_the_commit_is_head_and_dirty_follows_tracked_files(checkout):
    pkg = str(checkout / "pkg")
    assert provenance.git_state(pkg) == {"commit": git(checkout, "rev-parse", "HEAD"),
                                         "dirty": False}
    (checkout / "notes.txt").write_text("untracked\n")
    assert provenance.git_state(pkg)["dirty"] is False
    (checkout / "README").write_text("changed\n")  # a tracked file outside the package
    assert provenance.git_state(pkg)["dirty"] is True
    git(checkout, "commit", "-qam", "two")
    state = provenance.git_state(pkg)
    assert state == {"commit": git(checkout, "rev-parse", "HEAD"), "dirty": False}
    assert state["commit"] != git(checkout, "rev-parse", "HEAD~1")


def test_a_package_its_repository_does_not_track_has_no_version(checkout):
    """A package installed into some other project's tree (a venv in a user's repo) does not
    take that project's commit."""
    (checkout / "venv" / "pkg").mkdir(parents=True)
    (checkout / "venv" / "pkg" / "__init__.py").write_text("")
    assert provenance.git_state(str(checkout / "venv" / "pkg")) == {"commit": None,
                                                                    "dirty": None}


def test_no_git_or_no_checkout_is_null_not_an_error(tmp_path, monkeypatch, checkout):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "__init__.py").write_text("")
    assert provenance.git_state(str(tmp_path / "plain")) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "plain"))  # no git on it
    assert provenance.git_state(str(checkout / "pkg")) == {"commit": None, "dirty": None}


def test_git_variables_of_the_caller_do_not_redirect_it(checkout, monkeypatch):
    """Inside a git hook GIT_DIR names the hook's repository, not the package's."""
    head = git(checkout, "rev-parse", "HEAD")
    monkeypatch.setenv("GIT_DIR", os.path.join(REPO, ".git"))
    assert provenance.git_state(str(checkout / "pkg"))["commit"] == head


def test_a_copy_of_the_package_outside_a_checkout_has_no_version(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(REPO, "octconv_exp"), copy / "octconv_exp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "import json; from octconv_exp.records import "
                          "provenance as p; print(json.dumps([p.PACKAGE_DIR, p.code_version()]))"],
                         cwd=copy, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(copy)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [str(copy / "octconv_exp"), {"commit": None, "dirty": None}]


# ------------------------------------------------------------------------------ real runs


def repo_state():
    """The checkout the tests run from: (HEAD, dirty), or None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head, bool(status.strip())


@pytest.mark.slow
def test_two_real_runs_compare_in_one_command(tmp_path):
    """Run a from this checkout, run b (another lr) from a copy of it that is no git checkout:
    the differing config key is lr alone, the metrics are metrics.json's numbers, a's record
    names this checkout's commit and b's none."""
    copy = tmp_path / "copy"
    for name in ("octconv_exp", "conf"):
        shutil.copytree(os.path.join(REPO, name), copy / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "run.py"), copy / "run.py")
    state = repo_state()
    res = run_cli(*SYNTHETIC_32_TWO_EPOCHS_NO_SAVES, f"hydra.run.dir={tmp_path / 'a'}")
    assert res.returncode == 0, res.stderr[-3000:]
    # The same figure setting as a's (run_cli adds it): the config keys differ in lr alone.
    res = subprocess.run([sys.executable, str(copy / "run.py"), *SYNTHETIC_32_TWO_EPOCHS_NO_SAVES,
                          "optimizer.lr=0.1", f"hydra.run.dir={tmp_path / 'b'}", CONFUSION_FIGURES],
                         cwd=copy, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = {}
    for name in ("a", "b"):
        with open(tmp_path / name / "metrics.json") as f:
            records[name] = json.load(f)
    assert records["b"]["code_version"] == {"commit": None, "dirty": None}
    if state is not None:
        assert records["a"]["code_version"] == {"commit": state[0], "dirty": state[1]}

    out = tmp_path / "cmp"
    res = run_python("-m", "octconv_exp.compare", str(tmp_path / "a"), str(tmp_path / "b"),
                     "--out", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    header, table = read_table(out / "compare.csv")
    assert header == ["section", "key", "a", "b"]
    assert [k for s, k in table if s == "config"] == ["optimizer.lr"]
    assert table[("config", "optimizer.lr")] == ["0.05", "0.1"]
    for key in ("test_accuracy", "train_loss", "train_accuracy", "flops_per_image", "params",
                "wall_seconds", "epochs_completed"):
        assert [float(v) for v in table[("metrics", key)]] == \
            [records["a"][key], records["b"][key]], key
    assert table[("metrics", "code_version.commit")][1] == ""
    assert png_size(out / "compare.png") == expected_png_size()
    assert "optimizer.lr" in res.stdout and "test_accuracy" in res.stdout
