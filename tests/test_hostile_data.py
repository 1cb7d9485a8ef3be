"""Hostile inputs, round three (issue 25: 3, 5, 12, 13, 14, 16, 22): a crafted CIFAR-10 batch,
a fresh run into a finished run's dir, a resume with fewer epochs than it trained, an
ambiguous validation size, a symbolic-link loop and a FIFO in an image folder, a user model
whose constructor raises. Each ends in one line and exit status 2 (or, for the folder, reads
what is there exactly once), with nothing recorded lost and no code run from data."""
import csv
import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import (SYNTHETIC_64_BATCH_8, compose_config as compose, file_sha256, run_cli,
                      write_cifar_fixture, write_image_folder)
from octconv_exp.data.datasets import load_cifar10
from octconv_exp.data.loading import load_image_folder
from octconv_exp.errors import ConfigError, UserError
from octconv_exp.data.streaming import scan_image_folder

def record(run_dir):
    """Every file of a run dir by content: what a refused command must leave as it was."""
    found = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.relpath(os.path.join(root, name), run_dir)
            # The log and each attempt's own Hydra files say what each attempt did: added
            # to, never rewritten.
            if name != "run.log" and not path.startswith(os.path.join(".hydra", "attempts")):
                found[path] = file_sha256(os.path.join(run_dir, path))
    return found


def one_error_line(res):
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr[-3000:]
    return res.stderr


# ------------------------------------------------------------------ 3: a crafted CIFAR-10 batch


class RunsCode:
    """Pickles as a call of os.system: what plain pickle.load runs while it reads."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def craft(path, marker, meta=False):
    """Replace a CIFAR-10 file with a valid-looking one whose unpickling runs `touch marker`."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    key = "label_names" if meta else "batch_label"
    entry[key] = RunsCode(f"touch {marker}")
    with open(path, "wb") as f:
        pickle.dump(entry, f)


@pytest.mark.parametrize("name", ["data_batch_2", "batches.meta"])
def test_a_crafted_cifar_file_runs_no_code(tmp_path, name):
    root = write_cifar_fixture(str(tmp_path / "data"), train_per_batch=8, test_size=8)
    path = os.path.join(root, "cifar-10-batches-py", name)
    marker = tmp_path / "MARKER"
    craft(path, marker, meta=name == "batches.meta")
    with open(path, "rb") as f:
        pickle.load(f, encoding="latin1")  # the payload works: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError) as info:
        load_cifar10(root, train=True, download=False, verify_checksums=False)
    assert not marker.exists()
    message = str(info.value)
    assert "posix.system" in message or "os.system" in message, message
    assert path in message and "refused without running it" in message


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_cifar_files_of_any_pickle_protocol_load_as_written(tmp_path, protocol):
    """numpy arrays pickle through other functions by protocol (2 from Python 3:
    _codecs.encode; 5: _frombuffer): each is read, into the very arrays written."""
    root = write_cifar_fixture(str(tmp_path), train_per_batch=8, test_size=8)
    folder = os.path.join(root, "cifar-10-batches-py")
    written = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            written[name] = pickle.load(f, encoding="latin1")
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(written[name], f, protocol=protocol)
    train = load_cifar10(root, train=True, download=False, verify_checksums=False)
    want = np.concatenate([written[f"data_batch_{b}"]["data"] for b in range(1, 6)])
    assert torch.equal(train.images, torch.from_numpy(want.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == sum((written[f"data_batch_{b}"]["labels"]
                                         for b in range(1, 6)), [])
    assert train.classes == written["batches.meta"]["label_names"]


def test_cifar_file_of_other_objects_is_corrupt_not_code(tmp_path):
    root = write_cifar_fixture(str(tmp_path), train_per_batch=8, test_size=8)
    path = os.path.join(root, "cifar-10-batches-py", "test_batch")
    with open(path, "wb") as f:  # a harmless object a batch never holds: refused all the same
        pickle.dump({"data": np.zeros((8, 3072), np.uint8), "labels": [0] * 8,
                     "when": __import__("datetime").date(2020, 1, 1)}, f)
    with pytest.raises(UserError, match="names datetime.date, which a CIFAR-10 batch never"):
        load_cifar10(root, train=False, download=False, verify_checksums=False)
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((8, 3072), np.float32), "labels": [0] * 8}, f)
    with pytest.raises(UserError, match="corrupt .*type float32"):
        load_cifar10(root, train=False, download=False, verify_checksums=False)


@pytest.mark.slow
def test_a_crafted_cifar_batch_through_run_py(tmp_path):
    root = write_cifar_fixture(str(tmp_path / "data"), train_per_batch=8, test_size=8)
    marker = tmp_path / "MARKER"
    craft(os.path.join(root, "cifar-10-batches-py", "data_batch_4"), marker)
    res = run_cli("dataset=cifar10", f"dataset.root={root}", "dataset.download=false",
                  "dataset.verify_checksums=false", "trainer.epochs=1",
                  "trainer.progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}")
    line = one_error_line(res)
    assert not marker.exists()
    assert "data_batch_4" in line and "system" in line


# ------------------------------------------------------ 5: a fresh run into a finished run's dir


def corrupt_image_folder(root):
    write_image_folder(root, classes=("a", "b"), per_class=(6, 3), size=32)
    with open(os.path.join(root, "train", "a", "broken.png"), "wb") as f:
        f.write(b"not an image")


@pytest.mark.slow
def test_a_fresh_run_into_a_finished_run_dir_is_refused_before_hydra_writes(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(*SYNTHETIC_64_BATCH_8, "trainer.epochs=1", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    before = record(run_dir)
    assert {"metrics.json", ".hydra/config.yaml", "model.pt", "checkpoints/last.pt"} <= set(before)
    folder = str(tmp_path / "folder")
    corrupt_image_folder(folder)
    # A run that would fail on its data, and one that would succeed: both refused up front.
    for args in (["dataset=image_folder", f"dataset.root={folder}", "trainer.epochs=1"],
                 [*SYNTHETIC_64_BATCH_8, "trainer.epochs=1"]):
        line = one_error_line(run_cli(*args, "trainer.progress_bar=false",
                                      f"hydra.run.dir={run_dir}"))
        assert "holds a run's record (metrics.json status completed, 1 epoch)" in line
        assert "resume=true" in line and "pick another dir" in line
        assert record(run_dir) == before  # metrics.json, .hydra/*.yaml, checkpoints: the same
        assert not (run_dir / ".hydra" / "attempts").exists()
    # Resuming it is what the line offers, and works.
    res = run_cli("resume=true", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_a_run_that_failed_before_training_may_be_started_again_in_its_dir(tmp_path):
    """Its line says "start the run again": the record holds no epoch, no checkpoint."""
    run_dir, folder = tmp_path / "run", str(tmp_path / "folder")
    corrupt_image_folder(folder)
    args = ["dataset=image_folder", f"dataset.root={folder}", "trainer.epochs=1",
            "trainer.batch_size=4", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    line = one_error_line(run_cli(*args))
    assert "broken.png" in line
    with open(run_dir / "metrics.json") as f:
        assert json.load(f)["status"] == "failed"
    os.unlink(os.path.join(folder, "train", "a", "broken.png"))
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(run_dir / "metrics.json") as f:
        assert json.load(f)["status"] == "completed"


# -------------------------------------------- 12: a resume with fewer epochs than it trained


@pytest.mark.slow
def test_a_resume_with_fewer_epochs_than_trained_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    # 8 steps an epoch: stopped 3 steps into epoch 2.
    res = run_cli(*SYNTHETIC_64_BATCH_8, "trainer.epochs=3", f"hydra.run.dir={run_dir}",
                  env={"OCTCONV_EXP_SIGNAL_AT": "step:11"})
    assert res.returncode == 130, res.stderr[-3000:]
    before = record(run_dir)
    line = one_error_line(run_cli("resume=true", "trainer.epochs=1", f"hydra.run.dir={run_dir}"))
    assert "trainer.epochs=1 is below what" in line
    assert "(1 epoch and 3 steps of epoch 2)" in line and "trainer.epochs=2 or more" in line
    assert record(run_dir) == before
    # Two epochs cover it: the run completes with 2.
    res = run_cli("resume=true", "trainer.epochs=2", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    with open(run_dir / "metrics.json") as f:
        m = json.load(f)
    assert (m["status"], m["epochs"], m["epochs_completed"]) == ("completed", 2, 2)
    # A completed 2-epoch run resumed with 1: refused, its record as it was.
    before = record(run_dir)
    line = one_error_line(run_cli("resume=true", "trainer.epochs=1", f"hydra.run.dir={run_dir}"))
    assert "(2 epochs)" in line and "trainer.epochs=2 or more" in line
    assert record(run_dir) == before


def test_the_epoch_check_counts_an_epoch_begun():
    from omegaconf import OmegaConf

    from octconv_exp.training.resume import check_epochs_cover_checkpoint

    def cfg(epochs):
        return OmegaConf.create({"trainer": {"epochs": epochs}})

    inside = {"epoch": 1, "progress": {"steps": 24}}
    with pytest.raises(UserError, match=r"trainer.epochs=1 .*\(1 epoch and 24 steps of epoch 2\)"):
        check_epochs_cover_checkpoint(cfg(1), inside, "last.pt")
    check_epochs_cover_checkpoint(cfg(2), inside, "last.pt")
    done = {"epoch": 3, "progress": None}
    with pytest.raises(UserError, match=r"trainer.epochs=2 .*\(3 epochs\)"):
        check_epochs_cover_checkpoint(cfg(2), done, "last.pt")
    check_epochs_cover_checkpoint(cfg(3), done, "last.pt")  # re-evaluates a finished run


# ----------------------------------------------------------- 13: dataset.val_size=1.0


def test_val_size_one_as_a_float_is_refused_and_as_a_count_is_one_image():
    from octconv_exp.config.schema import validate

    with pytest.raises(ConfigError) as info:
        validate(compose("dataset=synthetic", "dataset.val_size=1.0"), check_environment=False)
    message = str(info.value)
    assert message.startswith("dataset.val_size=1.0: is ambiguous")
    assert "integer" in message and "fraction below 1" in message
    for text, value in (("1", 1), ("5000", 5000), ("0.5", 0.5), ("0", 0)):
        cfg = compose("dataset=synthetic", f"dataset.val_size={text}")
        validate(cfg, check_environment=False)
        assert cfg.dataset.val_size == value and type(cfg.dataset.val_size) is type(value)


@pytest.mark.slow
def test_val_size_one_as_a_float_through_run_py(tmp_path):
    line = one_error_line(run_cli(*SYNTHETIC_64_BATCH_8, "dataset.val_size=1.0",
                                  f"hydra.run.dir={tmp_path}/r"))
    assert "dataset.val_size=1.0: is ambiguous" in line
    assert not (tmp_path / "r").exists()


# ---------------------------------------------- 14, 22: a link loop and a FIFO in an image folder


@pytest.fixture
def folder(tmp_path):
    root = str(tmp_path / "data")
    write_image_folder(root, classes=("a", "b"), per_class=(20, 5), size=32)
    return root


def test_a_link_loop_is_not_followed(folder):
    train = os.path.join(folder, "train")
    plain = scan_image_folder(train)
    os.symlink("..", os.path.join(train, "a", "loop"))  # train/a/loop -> train
    os.symlink(os.path.join("..", "..", ".."), os.path.join(train, "b", "up"))  # -> data/..
    os.symlink(os.path.join("..", "b"), os.path.join(train, "a", "to_b"))  # another class
    os.makedirs(os.path.join(folder, "extra"))
    for i, name in enumerate(os.listdir(os.path.join(train, "a"))[:2]):
        if name.endswith(".png"):
            os.link(os.path.join(train, "a", name), os.path.join(folder, "extra", f"e{i}.png"))
    os.symlink(os.path.join("..", "..", "extra"), os.path.join(train, "a", "x1"))
    os.symlink(os.path.join("..", "..", "extra"), os.path.join(train, "a", "x2"))  # twice
    files = scan_image_folder(train)
    extra = len(os.listdir(os.path.join(folder, "extra")))
    assert extra >= 1
    assert len(files) == len(plain) + extra == 40 + extra
    assert files.labels.tolist().count(1) == 20  # no class-b image labelled a
    assert [p for p, _ in files.samples if "/x1/" in p] and not [
        p for p, _ in files.samples if "/x2/" in p or "/loop/" in p or "/up/" in p
        or "/to_b/" in p]
    data = load_image_folder(train)
    assert len(data) == 40 + extra and data.labels.tolist().count(1) == 20


def test_a_fifo_named_like_an_image_is_skipped_unopened(folder, caplog):
    fifo = os.path.join(folder, "train", "b", "x.png")
    os.mkfifo(fifo)  # opening it would wait forever for a writer
    files = scan_image_folder(os.path.join(folder, "train"))
    assert len(files) == 40 and fifo not in [p for p, _ in files.samples]
    assert any("not regular files" in r.getMessage() and fifo in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_a_link_loop_and_a_fifo_through_run_py(folder, tmp_path):
    os.symlink("..", os.path.join(folder, "train", "a", "loop"))
    os.mkfifo(os.path.join(folder, "train", "b", "x.png"))
    run_dir = tmp_path / "run"
    res = run_cli("dataset=image_folder", f"dataset.root={folder}", "trainer.epochs=1",
                  "trainer.batch_size=8", "trainer.progress_bar=false",
                  f"hydra.run.dir={run_dir}", timeout=300)  # a FIFO read would hang here
    assert res.returncode == 0, res.stderr[-3000:]
    with open(run_dir / "epochs.csv") as f:
        assert [int(r["train_images"]) for r in csv.DictReader(f)] == [40]
    with open(run_dir / "metrics.json") as f:
        assert json.load(f)["test_samples"] == 10
    log = (run_dir / "run.log").read_text()  # the warnings: in the log and on the console
    for text in (log, res.stdout):
        assert "not following 1 link(s)" in text and "not regular files" in text


# ------------------------------------------------------ 16: a user model whose __init__ raises


USER_MODELS = '''
import torch.nn as nn


class Raises(nn.Module):
    def __init__(self, num_classes=10, error="RuntimeError"):
        super().__init__()
        raise {"RuntimeError": RuntimeError, "KeyError": KeyError}[error]("no weights at /x")
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "hostile_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return str(tmp_path)


@pytest.mark.parametrize("error", ["RuntimeError", "KeyError"])
def test_a_user_model_whose_constructor_raises_is_a_config_error(user_models, error):
    from octconv_exp.config.schema import validate

    with pytest.raises(ConfigError) as info:
        validate(compose("model._target_=hostile_models.Raises", f"+model.error={error}",
                         "dataset=synthetic"), check_environment=False)
    message = str(info.value)
    assert "model._target_=hostile_models.Raises" in message
    assert f"its constructor raised {error}:" in message and "no weights at /x" in message


@pytest.mark.slow
@pytest.mark.parametrize("error", ["RuntimeError", "KeyError"])
def test_a_user_model_whose_constructor_raises_through_run_py(user_models, tmp_path, error):
    line = one_error_line(run_cli("model._target_=hostile_models.Raises",
                                  f"+model.error={error}", *SYNTHETIC_64_BATCH_8,
                                  "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}",
                                  env={"PYTHONPATH": user_models}))
    assert "model._target_=hostile_models.Raises" in line
    assert f"its constructor raised {error}" in line
