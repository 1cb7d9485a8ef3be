"""The IPU backend, against a test double of poptorch (tests/poptorch_double) that enforces the
real API's signatures and semantics. No IPU or Poplar SDK is needed."""
import importlib
import json
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, run_cli

DOUBLE = os.path.join(REPO, "tests", "poptorch_double")
SMALL = ["dataset=synthetic", "dataset.train_size=960", "dataset.test_size=437",
         "trainer.epochs=2", "trainer.batch_size=8", "trainer.test_batch_size=10",
         "trainer.progress_bar=false", "ipu.num_workers=0"]


@pytest.fixture
def poptorch(monkeypatch):
    """The double, importable as `poptorch` for this test only."""
    monkeypatch.syspath_prepend(DOUBLE)
    for name in [m for m in sys.modules if m == "poptorch" or m.startswith("poptorch.")]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("poptorch")
    for key in module.LOG:
        module.LOG[key].clear()
    module._IPUS_IN_USE[0] = 0
    yield module
    for name in [m for m in sys.modules if m == "poptorch" or m.startswith("poptorch.")]:
        sys.modules.pop(name, None)


def run_ipu(tmp_path, *args, ipus=0):
    log = tmp_path / "poptorch_log.json"
    env = {"PYTHONPATH": DOUBLE, "POPTORCH_DOUBLE_LOG": str(log), "POPTORCH_DOUBLE_IPUS": str(ipus)}
    res = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", env=env)
    record = json.loads(log.read_text()) if log.exists() else None
    metrics_path = tmp_path / "run" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    return res, record, metrics


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=os.path.join(REPO, "conf")):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vanilla", "octave", "multi-octave"])
def test_every_conv_mode_runs_through_run_py_on_the_double(mode, tmp_path):
    cache = tmp_path / "cache"
    res, log, m = run_ipu(
        tmp_path, "device=ipu", f"conv={mode}", "alpha=0.25", *SMALL, "ipu.device_iterations=3",
        "ipu.replicas=2", "ipu.gradient_accumulation=2", f"ipu.cache_dir={cache}",
        "ipu.available_memory_proportion=0.3", "scheduler=step", "scheduler.step_size=1",
        "conv.multi_conv.plan_type=serial",
        "conv.multi_conv.available_memory_proportions=[0.1,0.2,0.3,0.4]",
        "conv.multi_conv.partials_types=[half]", ipus=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["status"] == "completed" and m["device"] == "ipu"
    # Every test image evaluated: 437 = 14 whole combined batches of 10 x 3 x 2, plus 17.
    assert m["test_samples"] == 437
    assert m["test_accuracy"] > 10.0

    train_exec, infer_exec = log["executors"]
    assert train_exec["training"] and not infer_exec["training"]
    opts = train_exec["options"]
    assert (opts["device_iterations"], opts["replication_factor"], opts["gradient_accumulation"]) == (3, 2, 2)
    assert opts["output_mode"] == "Final" and opts["random_seed"] == 0
    assert opts["popart"]["cachePath"] == os.path.join(str(cache), f"{mode}-train")
    assert opts["available_memory_proportion"] == {"0": 0.3}
    iopts = infer_exec["options"]
    assert iopts["popart"]["cachePath"] == os.path.join(str(cache), f"{mode}-inference")
    assert iopts["output_mode"] == "All" and iopts["gradient_accumulation"] == 1
    assert train_exec["model_mode_at_wrap"] == "train" and infer_exec["model_mode_at_wrap"] == "eval"
    assert train_exec["input_batch_sizes"] == [8 * 3 * 2 * 2]
    assert train_exec["samples"] == 2 * (960 // 96) * 96  # whole combined batches, 2 epochs
    assert infer_exec["input_batch_sizes"] == [60]  # the tail was padded to a whole batch
    assert infer_exec["calls"] == 8
    # Before each epoch's checkpoint, and once more before inference.
    assert train_exec["copy_weights_to_host"] == 3 and train_exec["detach"] == 1
    assert infer_exec["detach"] == 1  # the IPUs are released at the end
    assert train_exec["optimizer"]["class"] == "SGD"
    assert train_exec["set_optimizer_lrs"] == pytest.approx([0.005, 0.0005])  # StepLR reached the IPU

    loaders = log["dataloaders"]
    assert loaders[0] == {"batch_size": 8, "combined": 96, "shuffle": True, "drop_last": True,
                          "num_workers": 0, "mode": "Async", "dataset_size": 960}
    assert loaders[1]["combined"] == 60 and loaders[1]["dataset_size"] == 420

    if mode == "multi-octave":
        groups = {(g["convs"], tuple(g["available_memory_proportions"])) for g in log["multiconv"]}
        # First layer: h2h, h2l; inner: all four; last: h2h, l2h.
        assert groups == {(2, (0.1, 0.2)), (4, (0.1, 0.2, 0.3, 0.4)), (2, (0.1, 0.4))}
        assert all(g["plan_type"] == "Serial" and g["partials_types"] == [1] for g in log["multiconv"])
    else:
        assert log["multiconv"] == []  # only multi-octave groups its convolutions


@pytest.mark.slow
def test_device_auto_picks_the_ipu_when_poptorch_sees_one(tmp_path):
    res, log, m = run_ipu(tmp_path, "device=auto", *SMALL, "trainer.epochs=1",
                          "ipu.device_iterations=2", ipus=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["device"] == "ipu" and len(log["executors"]) == 2


@pytest.mark.slow
def test_device_auto_without_ipus_stays_on_the_cpu(tmp_path):
    res, log, m = run_ipu(tmp_path, "device=auto", *SMALL, "trainer.epochs=1", ipus=0)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["device"] == "cpu" and log["executors"] == []


@pytest.mark.slow
def test_device_ipu_without_poptorch_is_one_line(tmp_path):
    res = run_cli("device=ipu", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert "Poplar SDK" in res.stderr and "poptorch" in res.stderr


@pytest.mark.slow
def test_device_ipu_without_hardware_suggests_the_ipu_model(tmp_path):
    res, _, _ = run_ipu(tmp_path, "device=ipu", *SMALL, ipus=0)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "ipu.use_ipu_model=true" in res.stderr


@pytest.mark.slow
def test_ipu_model_runs_without_hardware(tmp_path):
    res, log, m = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", *SMALL,
                          "trainer.epochs=1", "ipu.device_iterations=4", ipus=0)
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["executors"][0]["options"]["use_model"] is True
    assert m["test_samples"] == 437


@pytest.mark.slow
@pytest.mark.parametrize("output_mode, has_accuracy", [("all", True), ("sum", False)])
def test_output_modes(output_mode, has_accuracy, tmp_path):
    res, log, m = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", *SMALL,
                          "trainer.epochs=1", "ipu.device_iterations=4",
                          f"ipu.output_mode={output_mode}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["executors"][0]["options"]["output_mode"] == output_mode.capitalize()
    assert (m["train_accuracy"] is not None) == has_accuracy
    assert 0 < m["train_loss"] < 5  # the summed loss is brought back to a per-batch mean


@pytest.mark.slow
def test_lamb_and_loss_scaling_reach_poptorch_optim(tmp_path):
    res, log, _ = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", "optimizer=lamb",
                          "ipu.loss_scaling=128", *SMALL, "trainer.epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["executors"][0]["optimizer"] == {"class": "LAMB", "lr": 0.001, "loss_scaling": 128.0}


@pytest.mark.slow
def test_lamb_elsewhere_is_refused(tmp_path):
    res = run_cli("optimizer=lamb", "device=cpu", *SMALL, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "only available on IPUs" in res.stderr


@pytest.mark.slow
def test_profile_on_ipu_is_the_seeds(tmp_path):
    prof = tmp_path / "prof"
    res, log, _ = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", "conv=octave",
                          f"profile_dir={prof}", "dataset=synthetic", "ipu.device_iterations=7")
    assert res.returncode == 0, res.stderr[-3000:]
    (executor,) = log["executors"]
    assert executor["calls"] == 1 and executor["input_batch_sizes"] == [8 * 7]
    assert executor["options"]["popart"]["syntheticDataMode"] == 2  # RandomNormal, no host I/O


def test_profile_with_cache_dir_is_refused():
    from octconv_exp.config import validate
    from octconv_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="ipu.cache_dir"):
        validate(compose("device=ipu", "profile_dir=/tmp/p", "ipu.cache_dir=/tmp/c"),
                 check_environment=False)


# ------------------------------------------------------------------------------ the seed's checks


def _backend(poptorch, *overrides):
    from octconv_exp.backends.ipu import IpuBackend

    cfg = compose("device=ipu", "ipu.use_ipu_model=true", *overrides)
    return IpuBackend(cfg), cfg


@pytest.mark.parametrize("mode", ["vanilla", "octave", "multi-octave"])
def test_cpu_and_ipu_outputs_agree(poptorch, mode):
    from octconv_exp.model import build_model

    backend, cfg = _backend(poptorch, f"conv={mode}", "ipu.device_iterations=2")
    backend.test_options = backend.make_options(train=False)
    ipu_model = backend.build_model(num_classes=10)
    cpu_model = build_model(cfg)  # multi-octave: the fused CPU implementation
    cpu_model.load_state_dict(ipu_model.state_dict())
    cpu_model.eval()
    x = torch.randn(2 * 80, 3, 32, 32)
    infer = backend.inference_step(ipu_model)
    assert torch.allclose(infer(x), cpu_model(x), atol=1e-5)
    # A tail shorter than a combined batch is padded and cut back.
    assert torch.allclose(infer(x[:7]), cpu_model(x[:7]), atol=1e-5)
    backend.close()


@pytest.mark.parametrize("mode", ["vanilla", "octave", "multi-octave"])
def test_first_training_step_matches_plain_pytorch(poptorch, mode):
    backend, cfg = _backend(poptorch, f"conv={mode}", "ipu.device_iterations=1")
    backend.train_options = backend.make_options(train=True)
    from octconv_exp.model import build_model

    torch.manual_seed(0)
    model = backend.build_model(num_classes=10)
    reference = build_model(cfg)
    reference.load_state_dict(model.state_dict())
    optimizer = backend.build_optimizer(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=cfg.optimizer.lr)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, loss = backend.training_step(model, optimizer)(x, y)
    reference.train()
    _, ref_loss = reference(x, y)
    ref_loss.backward()
    ref_opt.step()
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    backend.close()


# ------------------------------------------------------------------------------ the double enforces


def test_double_refuses_a_second_training_wrap(poptorch):
    model = torch.nn.Linear(2, 2)
    poptorch.trainingModel(model, poptorch.Options())
    with pytest.raises(poptorch.PoptorchError, match="already been wrapped"):
        poptorch.trainingModel(model, poptorch.Options())


def test_double_options_freeze_and_inference_refuses_accumulation(poptorch):
    opts = poptorch.Options().deviceIterations(2)
    opts.Training.gradientAccumulation(2)
    with pytest.raises(poptorch.PoptorchError, match="gradientAccumulation"):
        poptorch.inferenceModel(torch.nn.Linear(2, 2), opts)
    with pytest.raises(poptorch.PoptorchError, match="frozen"):
        opts.deviceIterations(3)
    with pytest.raises(AttributeError, match="outputMode"):
        poptorch.Options().anchorMode(None)


def test_double_enforces_combined_batches(poptorch):
    opts = poptorch.Options().deviceIterations(4)
    ds = torch.utils.data.TensorDataset(torch.zeros(10, 2))
    with pytest.raises(AssertionError, match="drop_last=False"):
        poptorch.DataLoader(opts.clone(), ds, batch_size=2, drop_last=False,
                            mode=poptorch.DataLoaderMode.Async)
    loader = poptorch.DataLoader(opts, ds, batch_size=2)
    assert loader.combinedBatchSize == 8 and len(loader) == 1
    model = poptorch.inferenceModel(torch.nn.Linear(2, 2),
                                    poptorch.Options().deviceIterations(4).useIpuModel(True))
    with pytest.raises(AssertionError, match="must be a multiple"):
        model(torch.zeros(6, 2))
    model(torch.zeros(8, 2))
    with pytest.raises(poptorch.PoptorchError, match="compiled for inputs"):
        model(torch.zeros(4, 2))


def test_double_steps_once_per_device_iteration(poptorch):
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 3)

        def forward(self, x, labels):
            out = torch.log_softmax(self.lin(x), dim=1)
            return out, torch.nn.functional.nll_loss(out, labels)

    model = Counting()
    optimizer = poptorch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *a: steps.append(1))
    opts = poptorch.Options().deviceIterations(3).useIpuModel(True)
    opts.Training.gradientAccumulation(2)
    training = poptorch.trainingModel(model, opts, optimizer)
    out, loss = training(torch.randn(3 * 2 * 4, 2), torch.zeros(24, dtype=torch.int64))
    assert len(steps) == 3
    assert out.shape == (4, 3) and loss.shape == ()  # Final: the last micro-batch


def test_double_multiconv_checks(poptorch):
    conv_a, conv_b = torch.nn.Conv2d(1, 1, 3), torch.nn.Conv2d(1, 1, 3)
    x = torch.randn(1, 1, 5, 5)
    with pytest.raises(poptorch.PoptorchError, match="Nested"):
        with poptorch.MultiConv():
            with poptorch.MultiConv():
                pass
    with pytest.raises(poptorch.PoptorchError, match="3 values given for 2 convolutions"):
        with poptorch.MultiConv().availableMemoryProportions([0.1, 0.2, 0.3]):
            conv_a(x)
            conv_b(x)
    with pytest.raises(AssertionError, match="Invalid plan type"):
        poptorch.MultiConv().planType("parallel")


def test_ipu_backend_needs_ipus_or_the_model(poptorch, monkeypatch):
    from octconv_exp.backends.ipu import IpuBackend
    from octconv_exp.errors import UserError

    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "0")
    with pytest.raises(UserError, match="use_ipu_model"):
        IpuBackend(compose("device=ipu"))
    IpuBackend(compose("device=ipu", "ipu.use_ipu_model=true"))


def test_count_correct_aligns_on_the_last_rows():
    from octconv_exp.loop import count_correct

    labels = torch.tensor([0, 1, 2, 3])
    output = torch.nn.functional.one_hot(torch.tensor([2, 0]), 4).float()  # last two rows: 2, 3
    correct, n = count_correct(output, labels)
    assert (int(correct), n) == (1, 2)


def test_options_of_the_config_reach_poptorch(poptorch):
    backend, cfg = _backend(poptorch, "ipu.device_iterations=7", "ipu.replicas=2",
                            "ipu.gradient_accumulation=3", "ipu.synthetic_data=true", "seed=5",
                            "ipu.output_mode=all")
    train, infer = backend.make_options(train=True), backend.make_options(train=False)
    assert (train.device_iterations, train.replication_factor,
            train.Training.gradient_accumulation) == (7, 2, 3)
    assert infer.Training.gradient_accumulation == 1
    assert train.output_mode == poptorch.OutputMode.All and infer.output_mode == poptorch.OutputMode.All
    assert train.random_seed == 5 and train._Popart.options["syntheticDataMode"] == 2
    assert OmegaConf.select(cfg, "ipu.cache_dir") is None
    assert "cachePath" not in train._Popart.options


def test_double_ipus_stay_taken_until_detached(poptorch, monkeypatch):
    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "1")
    first = poptorch.inferenceModel(torch.nn.Linear(2, 2), poptorch.Options())
    second = poptorch.inferenceModel(torch.nn.Linear(2, 2), poptorch.Options())
    first(torch.zeros(1, 2))
    with pytest.raises(poptorch.PoptorchError, match="Failed to acquire"):
        second(torch.zeros(1, 2))
    first.detachFromDevice()
    second(torch.zeros(1, 2))
    with pytest.raises(poptorch.PoptorchError, match="not attached"):
        first.detachFromDevice()
