"""What a run leaves in its output dir is written atomically (octconv_exp/records/outputs.py): a
write that fails or is interrupted half-way leaves the previous file whole and no temp file."""
import errno
import json
import os
import stat

import pytest
import torch

from octconv_exp.records import outputs
from octconv_exp.records.outputs import OutputError, atomic_write


def listing(path):
    return sorted(os.listdir(path))


def half_written(error):
    """A writer that writes part of the new content, notes what a reader sees meanwhile (the
    old file, and the temp file beside it), then fails with ``error``."""
    def write(f):
        f.write(b'{"status": "hal')
        f.flush()
        seen.append(open(write.path).read())
        folder.append(listing(os.path.dirname(write.path)))
        raise error

    seen, folder = [], []
    write.seen, write.folder = seen, folder
    return write


@pytest.mark.parametrize("error, raised", [
    (OSError(errno.ENOSPC, "No space left on device"), OutputError),  # disk full
    (KeyboardInterrupt(), KeyboardInterrupt),  # a signal between the temp file and the rename
    (RuntimeError("PytorchStreamWriter failed writing file data/0"), OutputError),  # torch.save
    (RuntimeError("something else"), RuntimeError),
])
def test_an_interrupted_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path, error, raised):
    path = tmp_path / "metrics.json"
    outputs.write_json_atomic(path, {"status": "completed"})
    old = path.read_text()
    write = half_written(error)
    write.path = path
    with pytest.raises(raised) as info:
        atomic_write(path, write)
    assert write.seen == [old]  # while the new content was being written, readers saw the old
    # The temp file is beside the target (the same file system: the rename is atomic), hidden
    # and named after it.
    (during,) = write.folder
    assert len(during) == 2 and during[1] == "metrics.json"
    assert during[0].startswith(".metrics.json.") and len(during[0]) > len(".metrics.json.")
    assert path.read_text() == old and json.loads(old) == {"status": "completed"}
    assert listing(tmp_path) == ["metrics.json"]  # no temp file left behind
    if raised is OutputError:
        reason = "no space left on device" if isinstance(error, OSError) else \
            "pytorchstreamwriter failed writing file data/0"
        assert str(info.value) == (f"cannot write {path}: {reason}; the previous version, if any, "
                                   "is intact")
        assert info.value.__cause__ is None and info.value.__suppress_context__
    else:
        assert info.value is error  # not a write failure: passed on as it is


def test_a_failed_first_write_leaves_nothing(tmp_path):
    path = tmp_path / "epochs.csv"
    write = half_written(OSError(errno.EROFS, "Read-only file system"))
    write.path = tmp_path / "other"
    (tmp_path / "other").write_text("x")
    with pytest.raises(OutputError, match="read-only file system"):
        atomic_write(path, write)
    assert listing(tmp_path) == ["other"]


def test_the_new_file_replaces_the_old_one_whole_and_is_readable_by_the_group(tmp_path,
                                                                             monkeypatch):
    """fsync'ed before the rename; 0644 like any file the run writes (mkstemp's 0600 would
    hide the results from the others sharing a sweep dir)."""
    path = tmp_path / "metrics.json"
    path.write_text("old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))  # everything written reaches the disk
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    outputs.write_text_atomic(path, "new content\n")
    monkeypatch.undo()
    assert events == [("fsync", len("new content\n")), ("replace", "metrics.json")]
    assert path.read_text() == "new content\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert listing(tmp_path) == ["metrics.json"]


def test_json_csv_and_torch_files_read_back(tmp_path):
    # The names the README documents and the sweep report reads.
    assert (outputs.METRICS_FILE, outputs.EPOCHS_FILE, outputs.MODEL_FILE) == (
        "metrics.json", "epochs.csv", "model.pt")
    outputs.write_json_atomic(tmp_path / "m.json", {"status": "completed", "b": [1.5, None]})
    # Indented, keys in the order given (metrics.json opens with its status).
    assert (tmp_path / "m.json").read_text() == (
        '{\n  "status": "completed",\n  "b": [\n    1.5,\n    null\n  ]\n}\n')
    row = {"epoch": 1, "train_loss": 2.5, "train_accuracy": 10.0, "train_images": 80,
           "train_seconds": 1.5, "train_images_per_second": 53.33, "lr": 0.05, "val_loss": None,
           "val_accuracy": None, "ignored": "x"}
    outputs.write_epochs_csv(tmp_path / "epochs.csv", [row, dict(row, epoch=2)])
    assert (tmp_path / "epochs.csv").read_text() == (
        ",".join(outputs.EPOCH_COLUMNS) + "\n"
        "1,2.5,10.0,80,1.5,53.33,0.05,,\n2,2.5,10.0,80,1.5,53.33,0.05,,\n")
    outputs.save_torch_atomic(tmp_path / "model.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.arange(3))
    assert listing(tmp_path) == ["epochs.csv", "m.json", "model.pt"]


def test_package_versions_name_what_is_installed(monkeypatch):
    from importlib import metadata

    import platform

    from octconv_exp import __version__

    v = outputs.package_versions()
    assert v["python"] == platform.python_version()
    assert v["torch"] == metadata.version("torch") and v["numpy"] == metadata.version("numpy")
    assert v["octconv_exp"] == __version__
    named = {"python", "torch", "torchvision", "octconv", "hydra-core", "omegaconf", "numpy",
             "octconv_exp"}
    try:
        metadata.version("poptorch")
        assert set(v) == named | {"poptorch"}
    except metadata.PackageNotFoundError:
        assert set(v) == named  # poptorch only inside a Poplar SDK environment

    real = metadata.version

    def version(dist, missing=("octconv", "poptorch")):
        if dist in missing:
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(outputs.metadata, "version", version)
    v = outputs.package_versions()
    assert v["octconv"] is None and "poptorch" not in v and set(v) == named  # null: not there
    monkeypatch.setattr(outputs.metadata, "version",
                        lambda dist: "3.4.0" if dist == "poptorch" else real(dist))
    assert outputs.package_versions()["poptorch"] == "3.4.0"
