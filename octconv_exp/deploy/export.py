"""A run's model as a file to deploy: TorchScript or ONNX, checked against the framework.

    python -m octconv_exp.export RUN_DIR --format torchscript|onnx [--out PATH] [--opset N]

The exported model is the run's ``model.pt`` (the weights its test accuracy was measured with)
behind the run's stored normalisation (the checkpoint's inference record,
:func:`~octconv_exp.training.checkpoint.inference_record`), so it needs nothing from octconv-exp:

- input ``images``: uint8, (N, C, H, W) with the run's C, H, W (``input_shape``), values
  0-255, RGB; N, the batch, is free (a dynamic axis in ONNX);
- output ``logits``: float32, (N, classes), in the order of the run's class names; for the
  seed CNN these are its log-probabilities (logits whose softmax is the same).

Before the file is put in place, it runs on the run's whole test set (TorchScript under
``torch.jit.load``, ONNX under ONNX Runtime) beside the framework's model
(:func:`~octconv_exp.deploy.inference.load_model`): their outputs must agree to float tolerance, or
nothing is written and the exit status is 1. A user's mistake (no run dir, no model.pt, no
onnxruntime, a test set that cannot be read) is one line and exit status 2.
"""
import argparse
import contextlib
import inspect
import io
import json
import math
import os
import sys
import tempfile
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from ..config.targets import trusted_model_target
from ..data.datasets import Normalise, check_classes, load_cifar10, load_custom, make_synthetic
from ..data.streaming import decode_files, scan_image_folder
from ..errors import USER_ERROR_EXIT, UserError
from ..records.outputs import METRICS_FILE, MODEL_FILE, OutputError
from ..training.checkpoint import INFERENCE, load
from .inference import load_model

#: The formats and the file name each is written to in the run dir (without ``--out``).
FORMATS = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
#: The ONNX opset written by default: the newest that torch 2.0.1's TorchScript-based exporter
#: and ONNX Runtime 1.15+ both support well; Resize (octconv's upsampling) needs 11 or more.
DEFAULT_OPSET = 17
MIN_OPSET = 11
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: How far the exported model's outputs may be from the framework's: float32 rounding of the
#: same arithmetic in other kernels (ONNX Runtime's convolutions, the normalisation folded into
#: one multiply-add), relative to the size of the outputs.
ATOL = 1e-4
RTOL = 1e-4
#: The exit status of an export whose outputs disagree with the framework's.
MISMATCH_EXIT = 1
BATCH = 256
USAGE = ("python -m octconv_exp.export RUN_DIR --format torchscript|onnx [--out PATH] "
         "[--opset N]")


class ExportMismatch(Exception):
    """The exported model's outputs are not the framework's (a bug in an exporter)."""


class Check(NamedTuple):
    """The exported model beside the framework's on ``images`` test images."""
    images: int
    max_abs_diff: float
    tolerance: float
    agreement: float  # percent of images with the same top-1 class
    exported_accuracy: float  # percent
    framework_accuracy: float
    recorded_accuracy: Optional[float]  # metrics.json's test_accuracy, None when absent


class ImageClassifier(nn.Module):
    """A framework model (``net(x)``: outputs of normalised images) behind the normalisation
    the training loader applied (:class:`~octconv_exp.data.datasets.Normalise`): uint8 images
    (N, C, H, W), 0-255, in; logits (N, classes) out."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        normalise = Normalise(mean, std)
        self.register_buffer("scale", normalise.scale.clone())
        self.register_buffer("shift", normalise.shift.clone())

    def forward(self, images):
        # Normalise's own arithmetic, so the inputs are the very ones the run tested.
        return self.net(torch.addcmul(self.shift, images.to(torch.float32), self.scale))


def export_torchscript(model, example, path):
    """``model`` traced on ``example`` into ``path`` (tracing, not scripting: octconv's
    OctConv2d passes tuples of optional tensors that TorchScript's compiler cannot type)."""
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warns about what these models do on purpose (shapes read in Python at a
        # fixed image size), newer torch that it is deprecated: the check after the export
        # is what says whether the file is right.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
        torch.jit.save(traced, path)


def export_onnx(model, example, path, opset):
    """``model`` into ``path`` as ONNX at ``opset`` with a dynamic batch axis, through the
    TorchScript-based exporter: torch's newer default (dynamo) needs onnxscript and does not
    exist in torch 2.0.1."""
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                  opset_version=int(opset), do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    # torch 2.0.1 prints a diagnostics summary of a successful export on stdout.
    with warnings.catch_warnings(), torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # as export_torchscript's
        torch.onnx.export(model, (example,), path, **kwargs)


def max_opset():
    """The newest opset this torch's TorchScript-based ONNX exporter writes (asked before it
    runs: refusing one, it prints its whole graph on stderr)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return DEFAULT_OPSET
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
                       getattr(_constants, "ONNX_MAX_OPSET", DEFAULT_OPSET)))


def onnx_runtime():
    """The ``onnx`` and ``onnxruntime`` modules, or a UserError saying how to install them."""
    try:  # optional: only --format onnx needs them
        import onnx
        import onnxruntime  # optional: only the ONNX export check needs it
    except ImportError as exc:
        raise UserError(f"--format onnx needs the onnx and onnxruntime packages ({exc}); "
                        "pip install -r requirements.txt (or pip install onnx onnxruntime), "
                        "or use --format torchscript") from None
    return onnx, onnxruntime


def exported_runner(fmt, path, opset=DEFAULT_OPSET):
    """A function running the file at ``path``: uint8 image tensor -> outputs tensor."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # newer torch: deprecated (for torch.export)
            module = torch.jit.load(path, map_location="cpu").eval()

        def run(images):
            with torch.no_grad():
                return module(images)

        return run
    onnx, onnxruntime = onnx_runtime()
    onnx.checker.check_model(path)
    options = onnxruntime.SessionOptions()
    # The same threads as torch, so that a process limited to one core stays on one.
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = onnxruntime.InferenceSession(path, options,
                                               providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception classes
        if opset == DEFAULT_OPSET:
            raise
        raise UserError(f"--opset {opset}: ONNX Runtime {onnxruntime.__version__} cannot run "
                        f"the file ({' '.join(str(exc).split())[:200]}); the default is "
                        f"{DEFAULT_OPSET}") from None

    def run(images):
        out = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        return torch.from_numpy(out)

    return run


def in_batches(run, images, batch_size=BATCH):
    return torch.cat([run(images[i:i + batch_size])
                      for i in range(0, images.shape[0], batch_size)])


def compare(exported, reference, labels, recorded_accuracy=None):
    """The :class:`Check` of ``exported`` outputs against the framework's ``reference``."""
    diff = (exported.double() - reference.double()).abs().max().item()
    tolerance = ATOL + RTOL * reference.abs().max().item()
    top_exported, top_reference = exported.argmax(dim=1), reference.argmax(dim=1)
    n = labels.shape[0]

    def percent(count):
        return 100.0 * count / n

    return Check(images=n, max_abs_diff=diff, tolerance=tolerance,
                 agreement=percent((top_exported == top_reference).sum().item()),
                 exported_accuracy=percent((top_exported == labels).sum().item()),
                 framework_accuracy=percent((top_reference == labels).sum().item()),
                 recorded_accuracy=recorded_accuracy)


def check_line(check, fmt, path, input_shape, opset=None):
    """The one line an export prints."""
    what = "TorchScript" if fmt == "torchscript" else f"ONNX opset {opset}"
    shape = ", ".join(str(int(d)) for d in input_shape)
    recorded = ("" if check.recorded_accuracy is None
                else f", metrics.json {check.recorded_accuracy:.2f} %")
    verdict = "match" if passed(check) else "DO NOT match"
    return (f"{path} ({what}, uint8 {INPUT_NAME} (N, {shape}) -> {OUTPUT_NAME}): on the "
            f"{check.images} test images its outputs {verdict} the framework's (max abs "
            f"difference {check.max_abs_diff:.2e}, tolerance {check.tolerance:.1e}); top-1 "
            f"agreement {check.agreement:.2f} %; test accuracy {check.exported_accuracy:.2f} % "
            f"exported, {check.framework_accuracy:.2f} % framework{recorded}")


def passed(check):
    return math.isfinite(check.max_abs_diff) and check.max_abs_diff <= check.tolerance


def run_model_file(run_dir):
    """``run_dir``'s model.pt, or a UserError naming what is missing."""
    if not os.path.exists(run_dir):
        raise UserError(f"{run_dir}: no such run dir")
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: not a directory; give the run dir (the one holding "
                        f"{MODEL_FILE})")
    path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} holds no {MODEL_FILE} (a run that did not finish, or "
                        "trainer.save_model=false); export a finished run's dir")
    return path


def recorded_test_accuracy(run_dir):
    """metrics.json's test_accuracy (None without one)."""
    try:
        with open(os.path.join(run_dir, METRICS_FILE)) as f:
            value = json.load(f).get("test_accuracy")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def load_test_set(config, record, data_root=None, trust_dataset=None):
    """The test split of the data set the run's config names, with its classes checked
    against the ones the model was trained on. Code a config names (``dataset._target_``)
    runs only when the user names it (``trust_dataset``)."""
    node = dict((config or {}).get("dataset") or {})
    if data_root is not None:
        node["root"] = data_root
    classes = list(record["class_names"])
    name = node.get("name")
    if "_target_" in node:
        target = node["_target_"]
        if target != trust_dataset:
            raise UserError(f"the run's test set is built by dataset._target_={target}; a saved "
                            "config chooses no code to run: if you trust it, pass "
                            f"--trust-dataset {target}")
        _, test = load_custom(OmegaConf.create(node))
    elif name == "synthetic":
        test = make_synthetic(int(node["test_size"]), seed=int(node.get("seed", 0)),
                              split="test")
    elif name == "cifar10":
        test = load_cifar10(node.get("root", "data"), train=False, download=False,
                            verify_checksums=bool(node.get("verify_checksums", True)))
    elif name == "image_folder":
        if not node.get("root"):
            raise UserError("the run's config names no dataset.root; give --data-root")
        test = decode_files(scan_image_folder(
            os.path.join(node["root"], "test"), classes=classes,
            image_size=int(node.get("image_size", record["input_shape"][-1]))))
    else:
        raise UserError(f"the run's config names dataset {name!r}, whose test set this "
                        "command cannot read (synthetic, cifar10, image_folder or a "
                        "dataset._target_)")
    check_classes(test.classes, classes, f"the test set of dataset={name}")
    if tuple(test.images.shape[1:]) != tuple(record["input_shape"]):
        raise UserError(f"the test images are {tuple(test.images.shape[1:])} and the model "
                        f"takes {tuple(record['input_shape'])}")
    return test


def export(run_dir, fmt, out=None, opset=None, force=False, data_root=None, trust_model=None,
           trust_dataset=None):
    """Export ``run_dir``'s model (see the module's docstring); returns ``(path, Check)``.
    Raises :class:`ExportMismatch` (nothing written) when the outputs disagree."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserError("--opset applies to --format onnx only")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if fmt == "onnx":
        if not MIN_OPSET <= opset <= max_opset():
            raise UserError(f"--opset {opset}: {MIN_OPSET} (octconv's upsampling is ONNX "
                            f"Resize) to {max_opset()} (torch {torch.__version__}'s exporter); "
                            f"the default is {DEFAULT_OPSET}")
        onnx_runtime()
    model_path = run_model_file(run_dir)
    out = out or os.path.join(run_dir, FORMATS[fmt])
    if os.path.exists(out) and not force:
        raise UserError(f"{out} exists; give another --out, or --force to replace it")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UserError(f"--out {out}: the folder {out_dir} does not exist")

    state = load(model_path)
    record = state.get(INFERENCE)
    target = (record or {}).get("model", {}).get("_target_") if isinstance(record, dict) else None
    if target is not None and target != trust_model and not trusted_model_target(target):
        raise UserError(f"{model_path} names model._target_={target}, not one of octconv_exp's "
                        f"models; a saved file chooses no code to run: if you trust it, pass "
                        f"--trust-model {target}")
    framework = load_model(model_path, trust_target=trust_model)
    test = load_test_set(state.get("config"), record, data_root=data_root,
                         trust_dataset=trust_dataset)
    model = ImageClassifier(framework.module, framework.mean, framework.std).eval()
    reference = framework.scores(test.images, batch_size=BATCH).float()

    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", dir=out_dir)
    os.close(fd)
    try:
        example = test.images[:2].contiguous()
        if fmt == "torchscript":
            export_torchscript(model, example, tmp)
        else:
            export_onnx(model, example, tmp, opset)
        os.chmod(tmp, 0o644)
        exported = in_batches(exported_runner(fmt, tmp, opset), test.images.contiguous()).float()
        check = compare(exported, reference, test.labels, recorded_test_accuracy(run_dir))
        line = check_line(check, fmt, out, record["input_shape"],
                          opset if fmt == "onnx" else None)
        if not passed(check):
            raise ExportMismatch(line)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(out, exc) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out, check, line


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as every user error of the project (argparse prints usage + error).
        raise UserError(f"{message}; usage: {USAGE}")


def main(argv=None):
    parser = _Parser(prog="python -m octconv_exp.export",
                     description="Export a run's model (uint8 images in, logits out, the run's "
                                 "normalisation inside) as TorchScript or ONNX, checked "
                                 "against the framework's outputs on the run's test set.")
    parser.add_argument("run_dir", help="a finished run's dir (the one holding model.pt)")
    parser.add_argument("--format", required=True, choices=list(FORMATS),
                        help="torchscript: a traced module for torch.jit.load; onnx: an ONNX "
                             "file for ONNX Runtime")
    parser.add_argument("--out", help="the file to write (default: RUN_DIR/model.torchscript.pt "
                                      "or RUN_DIR/model.onnx)")
    parser.add_argument("--opset", type=int,
                        help=f"the ONNX opset (default {DEFAULT_OPSET}; {MIN_OPSET} or more)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--data-root", help="where the run's data set is now (dataset.root), "
                                            "if it moved")
    parser.add_argument("--trust-model", metavar="CLASS",
                        help="build the run's own model class (model._target_), as run.py "
                             "does when the command line names it")
    parser.add_argument("--trust-dataset", metavar="CLASS",
                        help="build the run's own data set class (dataset._target_) to read "
                             "its test set")
    try:
        args = parser.parse_args(argv)
        _, _, line = export(args.run_dir, args.format, out=args.out, opset=args.opset,
                            force=args.force, data_root=args.data_root,
                            trust_model=args.trust_model, trust_dataset=args.trust_dataset)
    except UserError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return USER_ERROR_EXIT
    except ExportMismatch as exc:
        sys.stderr.write(f"error: nothing written: {exc}\n")
        return MISMATCH_EXIT
    print(line)
    return 0
