"""The files a run writes itself (metrics.json, epochs.csv, model.pt, checkpoints/*.pt) go
through outputs.atomic_write: a temp file beside them, then os.replace. Checked at the call
sites without root (the disk-full test needs a tmpfs): every write-mode open() under the run
dir is recorded during a tiny in-process run; none may name a run file, and every file the run
leaves must have arrived by an os.replace from a temp file beside it. (run.log is a logging
FileHandler's append-only log and .hydra/ is Hydra's: neither exists in an in-process run.)"""
import builtins
import os

from conftest import SYNTHETIC_64_VAL_16, compose_config


def test_every_file_of_a_run_arrives_by_an_atomic_rename(tmp_path, monkeypatch):
    from octconv_exp.training.runner import run_experiment

    run_dir = os.path.abspath(tmp_path / "run")
    opened, replaced = [], []
    real_open, real_replace = builtins.open, os.replace

    def spy_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.path.abspath(os.fsdecode(file))
            if path.startswith(run_dir + os.sep):
                opened.append(path)
        return real_open(file, mode, *args, **kwargs)

    def spy_replace(src, dst, *args, **kwargs):
        replaced.append((os.path.abspath(os.fsdecode(src)), os.path.abspath(os.fsdecode(dst))))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "replace", spy_replace)
    run_experiment(compose_config(*SYNTHETIC_64_VAL_16), run_dir)
    monkeypatch.undo()

    left = sorted(os.path.relpath(os.path.join(d, f), run_dir)
                  for d, _, files in os.walk(run_dir) for f in files)
    assert left == ["checkpoints/best.pt", "checkpoints/last.pt", "confusion_matrix.csv",
                    "confusion_matrix.png", "epochs.csv", "metrics.json", "model.pt",
                    "per_class_accuracy.csv"]
    assert opened == []  # nothing written in place (atomic_write writes through mkstemp's fd)
    arrived = {dst for _, dst in replaced}
    assert {os.path.join(run_dir, f) for f in left} <= arrived
    for src, dst in replaced:
        if dst.startswith(run_dir + os.sep):
            # the temp file: beside its target, hidden, named after it
            assert os.path.dirname(src) == os.path.dirname(dst)
            assert os.path.basename(src).startswith("." + os.path.basename(dst) + ".")
    # each epoch's rows and checkpoint replaced the previous ones, not appended to them
    for name in ("epochs.csv", "checkpoints/last.pt"):
        assert [dst for _, dst in replaced].count(os.path.join(run_dir, name)) >= 2, name
