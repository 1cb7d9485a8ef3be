"""What a run leaves in its output dir, written atomically (temp file, then rename)."""
import csv
import io
import json
import os
import platform
import tempfile
from importlib import metadata

from ..errors import UserError
from ..version import __version__

METRICS_FILE = "metrics.json"
EPOCHS_FILE = "epochs.csv"
MODEL_FILE = "model.pt"
EPOCH_COLUMNS = ("epoch", "train_loss", "train_accuracy", "train_images", "train_seconds",
                 "train_images_per_second", "lr", "val_loss", "val_accuracy")


class OutputError(UserError):
    """A file of the run could not be written (disk full, read-only, a file in the way)."""

    def __init__(self, path, exc):
        reason = getattr(exc, "strerror", None) or str(exc)
        super().__init__(f"cannot write {os.path.abspath(path)}: {reason.lower()}; the previous "
                         "version, if any, is intact")


def atomic_write(path, write):
    """Write through ``write(file)`` into a temp file beside ``path``, then rename it over.
    A failure (disk full, ...) removes the temp file, leaves ``path`` as it was, and is an
    :class:`OutputError`."""
    try:
        _atomic_write(path, write)
    except OSError as exc:
        raise OutputError(path, exc) from None
    except RuntimeError as exc:  # torch.save reports a failed write as RuntimeError
        text = str(exc).lower()
        if "unexpected pos" in text:  # its zip writer found fewer bytes in the file than it wrote
            raise OutputError(path, OSError(
                "the file system took fewer bytes than were written (a full disk, or a file "
                "size limit)")) from None
        if "write" not in text:
            raise
        raise OutputError(path, exc) from None


def _atomic_write(path, write):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from a group sharing the sweep
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class _WriteErrorKept:
    """The file torch.save writes to, keeping the OSError of a failed write: torch's zip writer
    swallows it (a full disk, ``ulimit -f``) and raises ``RuntimeError: [enforce fail at
    inline_container.cc:...] unexpected pos ...``, which names no reason."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        self.file.flush()


def save_torch_atomic(path, obj):
    import torch  # deferred: loads torch; imported before torch at start-up

    def write(f):
        sink = _WriteErrorKept(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None  # "no space left on device", "file too large"
            raise

    atomic_write(path, write)


def write_epochs_csv(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in EPOCH_COLUMNS})
    write_text_atomic(path, buf.getvalue())


def package_versions():
    versions = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "octconv", "hydra-core", "omegaconf", "numpy", "poptorch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist == "poptorch":
                continue  # only present inside a Poplar SDK environment
            versions[dist] = None
    versions["octconv_exp"] = __version__
    return versions


def flatten(node, prefix=""):
    """A nested dict as one level with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``);
    a list or an empty dict stays one value, as JSON text."""
    flat = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return flat
