"""python -m octconv_exp.export: a run's model as TorchScript or ONNX (uint8 images in, the run's
stored normalisation inside, logits out), checked against the framework on the run's test set,
for every conv mode, the seed CNN and the ResNets; and its one-line errors."""
import os
import sys
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from conftest import (SYNTHETIC_200_ONE_EPOCH, read_metrics, run_cli, run_python,
                      write_cifar_fixture, write_image_folder)
from octconv_exp.data.datasets import make_synthetic
from octconv_exp.data.loading import load_data
from octconv_exp.deploy import export as exporting
from octconv_exp.deploy.inference import load_model
from octconv_exp.models.octave import build_model
from octconv_exp.training.runner import model_file

SEED_CNN = {"_target_": "octconv_exp.models.octave.ClassificationModel", "name": "seed_cnn"}
RESNET_CIFAR_8 = {"_target_": "octconv_exp.models.resnet.ResNetCifar", "name": "resnet_cifar",
                  "depth": 8}
RESNET_IMAGENET_26 = {"_target_": "octconv_exp.models.resnet.ResNetImageNet",
                      "name": "resnet_imagenet", "depth": 26}
SYNTHETIC = {"name": "synthetic", "train_size": 100, "test_size": 37, "seed": 0, "val_size": 0,
             "mean": None, "std": None}


def saved_run(run_dir, conv="octave", alpha=0.25, model=None, dataset=None, seed=0):
    """A run dir holding the model.pt a run would write, of an untrained model whose
    BatchNorm statistics are drawn at random (so that inference mode does something), without
    training it: what export reads, in a fraction of a run's time."""
    cfg = OmegaConf.create({"model": dict(model or SEED_CNN), "conv": {"mode": conv},
                            "alpha": alpha, "expansion": 1,
                            "trainer": {"label_smoothing": 0.0},
                            "dataset": dict(dataset or SYNTHETIC)})
    data = load_data(cfg.dataset)
    torch.manual_seed(seed)
    net = build_model(cfg, num_classes=len(data.train.classes))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    os.makedirs(run_dir, exist_ok=True)
    torch.save(model_file(cfg, net, len(data.train.classes), data),
               os.path.join(run_dir, "model.pt"))
    return data


def run_exported(fmt, path, images):
    """The exported file run as a user would, without octconv-exp: outputs of uint8 images."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # newer torch: deprecated (for torch.export)
            module = torch.jit.load(path)
        with torch.no_grad():
            return module(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].type == "tensor(uint8)"
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def accuracy(outputs, labels):
    return 100.0 * (outputs.argmax(dim=1) == labels).sum().item() / labels.shape[0]


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# ------------------------------------------------------------------------------ fast

CASES = [("seed_cnn", "vanilla", SEED_CNN), ("seed_cnn", "octave", SEED_CNN),
         ("seed_cnn", "multi-octave", SEED_CNN), ("resnet_cifar", "octave", RESNET_CIFAR_8),
         ("resnet_cifar", "multi-octave", RESNET_CIFAR_8)]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name, conv, model", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_the_exported_model_gives_the_frameworks_outputs_at_any_batch_size(
        tmp_path, capsys, name, conv, model, fmt):
    run_dir = str(tmp_path / "run")
    data = saved_run(run_dir, conv=conv, model=model)
    assert exporting.main([run_dir, "--format", fmt]) == 0
    line = capsys.readouterr().out
    path = os.path.join(run_dir, exporting.FORMATS[fmt])
    assert line.startswith(f"{path} (") and "outputs match the framework's" in line
    assert "on the 37 test images" in line and line.count("\n") == 1

    framework = load_model(run_dir)
    test = data.test
    reference = framework.scores(test.images)
    exported = run_exported(fmt, path, test.images)
    assert exported.shape == (37, 10) and exported.dtype == torch.float32
    assert (exported - reference).abs().max().item() < 1e-4
    assert accuracy(exported, test.labels) == accuracy(reference, test.labels)
    # The batch is free: one image, and a batch of another size than the one traced.
    assert torch.allclose(run_exported(fmt, path, test.images[5:6]), exported[5:6], atol=1e-5)
    assert torch.allclose(run_exported(fmt, path, test.images[:7]), exported[:7], atol=1e-5)
    # The normalisation is inside: raw pixels in, the framework's predict() out.
    assert exported.argmax(dim=1).tolist() == framework.predict(test.images).indices.tolist()


@pytest.mark.slow
def test_an_octave_resnet_imagenet_exports_to_onnx(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    data = saved_run(run_dir, conv="multi-octave", alpha=0.5, model=RESNET_IMAGENET_26,
                     dataset=dict(SYNTHETIC, test_size=6))
    assert exporting.main([run_dir, "--format", "onnx"]) == 0
    assert "outputs match the framework's" in capsys.readouterr().out
    exported = run_exported("onnx", os.path.join(run_dir, "model.onnx"), data.test.images)
    reference = load_model(run_dir).scores(data.test.images)
    assert torch.allclose(exported, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dataset", ["cifar10", "image_folder"])
def test_the_check_reads_the_runs_own_test_set(tmp_path, capsys, dataset):
    if dataset == "cifar10":
        root = write_cifar_fixture(str(tmp_path / "cifar"), train_per_batch=8, test_size=23)
        node = {"name": "cifar10", "root": root, "download": False, "verify_checksums": False,
                "seed": 0, "val_size": 0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
        n = 23
    else:
        root = write_image_folder(str(tmp_path / "imgs"), per_class=(4, 3), size=32)
        node = {"name": "image_folder", "root": root, "image_size": 32, "seed": 0,
                "val_size": 0, "mean": None, "std": None, "in_memory": "true"}
        n = 9
    run_dir = str(tmp_path / "run")
    data = saved_run(run_dir, conv="octave", dataset=node)
    assert exporting.main([run_dir, "--format", "torchscript"]) == 0
    assert f"on the {n} test images its outputs match" in capsys.readouterr().out
    # Moved: found again with --data-root, refused in one line without it.
    moved = str(tmp_path / "moved")
    os.rename(root, moved)
    out = str(tmp_path / "again.pt")
    assert exporting.main([run_dir, "--format", "torchscript", "--out", out]) == 2
    one_error_line(capsys)
    assert exporting.main([run_dir, "--format", "torchscript", "--out", out,
                           "--data-root", moved]) == 0
    exported = run_exported("torchscript", out, data.test.images)
    assert accuracy(exported, data.test.labels) == accuracy(
        load_model(run_dir).scores(data.test.images), data.test.labels)


def test_outputs_that_differ_from_the_frameworks_are_an_error_and_nothing_is_written(
        tmp_path, capsys, monkeypatch):
    run_dir = str(tmp_path / "run")
    saved_run(run_dir, conv="multi-octave")
    real = exporting.export_torchscript

    def off_by_a_little(model, example, path):
        with torch.no_grad():
            model.net.fc.bias[0] += 0.01  # what a wrong export would do: close, not equal
        real(model, example, path)

    monkeypatch.setattr(exporting, "export_torchscript", off_by_a_little)
    assert exporting.main([run_dir, "--format", "torchscript"]) == exporting.MISMATCH_EXIT
    err = one_error_line(capsys)
    assert "nothing written" in err and "DO NOT match" in err
    assert sorted(os.listdir(run_dir)) == ["model.pt"]  # no file, no temp file left


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    run_dir = str(tmp_path / "run")
    saved_run(run_dir)
    cases = [
        ([str(tmp_path / "nowhere"), "--format", "onnx"], "no such run dir"),
        ([str(tmp_path), "--format", "onnx"], "holds no model.pt"),
        ([str(tmp_path / "run" / "model.pt"), "--format", "onnx"], "not a directory"),
        ([run_dir, "--format", "tflite"],
         "argument --format: invalid choice: 'tflite' (choose from 'torchscript', 'onnx')"),
        ([run_dir], "the following arguments are required: --format"),
        ([run_dir, "--format", "torchscript", "--opset", "13"],
         "--opset applies to --format onnx only"),
        ([run_dir, "--format", "onnx", "--opset", "9"], "--opset 9: 11 (octconv's upsampling"),
        ([run_dir, "--format", "onnx", "--opset", "99"], "--opset 99: 11 (octconv's"),
        ([run_dir, "--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx")],
         "the folder"),
    ]
    for argv, message in cases:
        assert exporting.main(argv) == 2, argv
        assert message in one_error_line(capsys), argv
    assert sorted(os.listdir(run_dir)) == ["model.pt"]
    # An existing file is replaced only with --force.
    assert exporting.main([run_dir, "--format", "torchscript"]) == 0
    capsys.readouterr()
    assert exporting.main([run_dir, "--format", "torchscript"]) == 2
    assert "model.torchscript.pt exists; give another --out, or --force" in \
        one_error_line(capsys)
    assert exporting.main([run_dir, "--format", "torchscript", "--force"]) == 0
    capsys.readouterr()
    # Without ONNX Runtime (an import that fails, as when it is not installed).
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert exporting.main([run_dir, "--format", "onnx"]) == 2
    assert "--format onnx needs the onnx and onnxruntime packages" in one_error_line(capsys)
    assert not os.path.exists(os.path.join(run_dir, "model.onnx"))


def test_a_saved_config_naming_code_runs_nothing_unless_named(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    saved_run(run_dir)
    path = os.path.join(run_dir, "model.pt")
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    state["config"]["dataset"] = {"_target_": "os.system", "command": f"touch {marker}",
                                  "name": "custom"}
    torch.save(state, path)
    assert exporting.main([run_dir, "--format", "torchscript"]) == 2
    assert "--trust-dataset os.system" in one_error_line(capsys)
    state["inference"]["model"] = {"_target_": "os.system", "command": f"touch {marker}"}
    torch.save(state, path)
    assert exporting.main([run_dir, "--format", "torchscript"]) == 2
    assert "--trust-model os.system" in one_error_line(capsys)
    assert not marker.exists()


def test_the_module_runs_as_a_command_with_one_line_errors(tmp_path):
    out = run_python("-m", "octconv_exp.export", str(tmp_path / "none"), "--format", "onnx",
                     timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: {tmp_path / 'none'}: no such run dir\n"


# ------------------------------------------------------------------------------ end to end


def export_cli(run_dir, fmt):
    return run_python("-m", "octconv_exp.export", str(run_dir), "--format", fmt, timeout=600)


def check_exported_run(run_dir, test):
    recorded = read_metrics(run_dir)["test_accuracy"]
    reference = load_model(run_dir).scores(test.images)
    for fmt in ("torchscript", "onnx"):
        res = export_cli(run_dir, fmt)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"metrics.json {recorded:.2f} %" in res.stdout
        exported = run_exported(fmt, os.path.join(run_dir, exporting.FORMATS[fmt]), test.images)
        assert accuracy(exported, test.labels) == recorded, fmt
        assert (exported - reference).abs().max().item() < 1e-4, fmt


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["vanilla", "octave", "multi-octave"])
def test_an_exported_seed_cnn_reproduces_the_runs_test_accuracy(tmp_path, conv):
    run_dir = tmp_path / "run"
    res = run_cli(*SYNTHETIC_200_ONE_EPOCH, f"conv={conv}", "alpha=0.25", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    check_exported_run(run_dir, make_synthetic(60, seed=0, split="test"))


@pytest.mark.slow
@pytest.mark.sdk
def test_an_exported_octave_resnet20_reproduces_the_runs_test_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli(*SYNTHETIC_200_ONE_EPOCH, "model=resnet_cifar", "model.depth=20",
                  "conv=multi-octave", "alpha=0.25", "dataset.val_size=0.1",
                  f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    check_exported_run(run_dir, make_synthetic(60, seed=0, split="test"))
