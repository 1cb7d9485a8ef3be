"""The IPU backend, against a test double of poptorch (tests/poptorch_double) that enforces the
real API's signatures and semantics. No IPU or Poplar SDK is needed."""
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SYNTHETIC_960_FOR_IPU, compose_config as compose, DOUBLE, read_metrics, run_cli


def run_ipu(tmp_path, *args, ipus=0, env=None):
    log = tmp_path / "poptorch_log.json"
    if log.exists():
        log.unlink()
    full_env = {"PYTHONPATH": DOUBLE, "POPTORCH_DOUBLE_LOG": str(log),
                "POPTORCH_DOUBLE_IPUS": str(ipus), **(env or {})}
    res = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}", env=full_env)
    record = json.loads(log.read_text()) if log.exists() else None
    run_dir = tmp_path / "run"
    metrics = read_metrics(run_dir) if (run_dir / "metrics.json").exists() else None
    return res, record, metrics


#: The synthetic set's sizes for the runs whose assertions hold at any size (the device picked,
#: the options and optimizer compiled, a checkpoint refused, the images counted), after
#: SYNTHETIC_960_FOR_IPU: 64 training images, whole combined batches of 8 x 2 and 8 x 4
#: (ipu.device_iterations=2 and 4: 4 and 2 calls an epoch; the profile's 8 x 7 fits too), and
#: 57 test images, whole combined batches of 10 x 2 or 10 x 4 and then a tail of 17 padded to
#: one (as 437 has: the test loader and the padding both run).
SMALL_FOR_IPU = ["dataset.train_size=64", "dataset.test_size=57"]


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.sdk
@pytest.mark.parametrize("mode", ["vanilla", "octave", "multi-octave"])
def test_every_conv_mode_runs_through_run_py_on_the_double(mode, tmp_path):
    cache = tmp_path / "cache"
    res, log, m = run_ipu(
        tmp_path, "device=ipu", f"conv={mode}", "alpha=0.25", *SYNTHETIC_960_FOR_IPU,
        "ipu.device_iterations=3", "ipu.replicas=2", "ipu.gradient_accumulation=2",
        f"ipu.cache_dir={cache}", "ipu.available_memory_proportion=0.3", "scheduler=step",
        "scheduler.step_size=1", "conv.multi_conv.plan_type=serial",
        "conv.multi_conv.available_memory_proportions=[0.1,0.2,0.3,0.4]",
        "conv.multi_conv.partials_types=[half]", ipus=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["status"] == "completed" and m["device"] == "ipu"
    # Every test image evaluated: 437 = 14 whole combined batches of 10 x 3 x 2, plus 17.
    assert m["test_samples"] == 437
    # Learned, not chance: the 437 test images hold 43 or 44 of each of the 10 classes, so
    # predictions that ignore the images get at most 44 right on average, and
    # P(Binomial(437, 44/437) >= 110 right, i.e. > 25 %) < 2e-19. These runs reach 38.9 %
    # (octave, multi-octave) and 43.0 % (vanilla) here.
    assert m["test_accuracy"] > 25.0

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
    # Shuffled by the run's SeededEpochSampler, not by shuffle=True in the loader's worker.
    assert {k: loaders[0][k] for k in ("batch_size", "combined", "shuffle", "drop_last",
                                       "num_workers", "mode", "dataset_size")} == {
        "batch_size": 8, "combined": 96, "shuffle": False, "drop_last": True,
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
    res, log, m = run_ipu(tmp_path, "device=auto", *SYNTHETIC_960_FOR_IPU, *SMALL_FOR_IPU,
                          "trainer.epochs=1", "ipu.device_iterations=2", ipus=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["device"] == "ipu" and len(log["executors"]) == 2


@pytest.mark.slow
def test_device_auto_without_ipus_stays_on_the_cpu(tmp_path):
    res, log, m = run_ipu(tmp_path, "device=auto", *SYNTHETIC_960_FOR_IPU, *SMALL_FOR_IPU,
                          "trainer.epochs=1", ipus=0)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["device"] == "cpu" and log["executors"] == []


@pytest.mark.slow
def test_device_ipu_without_poptorch_is_one_line(tmp_path):
    res = run_cli("device=ipu", *SYNTHETIC_960_FOR_IPU, f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert "Poplar SDK" in res.stderr and "poptorch" in res.stderr


@pytest.mark.slow
def test_device_ipu_without_hardware_suggests_the_ipu_model(tmp_path):
    res, _, _ = run_ipu(tmp_path, "device=ipu", *SYNTHETIC_960_FOR_IPU, ipus=0)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "ipu.use_ipu_model=true" in res.stderr


@pytest.mark.slow
def test_ipu_model_runs_without_hardware(tmp_path):
    res, log, m = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU,
                          *SMALL_FOR_IPU, "trainer.epochs=1", "ipu.device_iterations=4", ipus=0)
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["executors"][0]["options"]["use_model"] is True
    assert m["test_samples"] == 57  # every test image: one combined batch of 10 x 4, a tail of 17


@pytest.mark.slow
@pytest.mark.parametrize("output_mode, has_accuracy", [("all", True), ("sum", False)])
def test_output_modes(output_mode, has_accuracy, tmp_path):
    res, log, m = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU,
                          *SMALL_FOR_IPU, "trainer.epochs=1", "ipu.device_iterations=4",
                          f"ipu.output_mode={output_mode}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["executors"][0]["options"]["output_mode"] == output_mode.capitalize()
    assert (m["train_accuracy"] is not None) == has_accuracy
    assert 0 < m["train_loss"] < 5  # the summed loss is brought back to a per-batch mean


@pytest.mark.slow
def test_lamb_and_loss_scaling_reach_poptorch_optim(tmp_path):
    res, log, _ = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", "optimizer=lamb",
                          "ipu.loss_scaling=128", *SYNTHETIC_960_FOR_IPU, "trainer.epochs=1",
                          "dataset.train_size=400")  # one combined batch of 8 x 50 (the default)
    assert res.returncode == 0, res.stderr[-3000:]
    optimizer = log["executors"][0]["optimizer"]
    assert {k: optimizer[k] for k in ("class", "lr", "loss_scaling")} == {
        "class": "LAMB", "lr": 0.001, "loss_scaling": 128.0}
    assert optimizer["variable"] == ["loss_scaling", "lr"]


@pytest.mark.slow
def test_lamb_elsewhere_is_refused(tmp_path):
    res = run_cli("optimizer=lamb", "device=cpu", *SYNTHETIC_960_FOR_IPU,
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "only available on IPUs" in res.stderr


@pytest.mark.slow
def test_profile_on_ipu_is_the_seeds(tmp_path):
    prof = tmp_path / "prof"
    res, log, _ = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", "conv=octave",
                          f"profile_dir={prof}", "dataset=synthetic", *SMALL_FOR_IPU,
                          "ipu.device_iterations=7")
    assert res.returncode == 0, res.stderr[-3000:]
    (executor,) = log["executors"]
    assert executor["calls"] == 1 and executor["input_batch_sizes"] == [8 * 7]
    assert executor["options"]["popart"]["syntheticDataMode"] == 2  # RandomNormal, no host I/O


@pytest.mark.slow
def test_profile_on_ipu_takes_the_model_and_the_datas_shape(tmp_path, image_folder_root):
    """A ResNet (wrapped in WithLoss: no ``fc`` of its own) profiles, compiled for the data's
    40x40 images and 3 classes, not the seed's 3x32x32 and 10 (issue 26.4)."""
    prof = tmp_path / "prof"
    res, log, metrics = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true",
                                "model=resnet_cifar", "model.depth=8", f"profile_dir={prof}",
                                "dataset=image_folder", f"dataset.root={image_folder_root}",
                                "dataset.image_size=40", "ipu.device_iterations=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert metrics["status"] == "profiled"
    (executor,) = log["executors"]
    assert executor["input_shapes"] == {"x": [[8 * 2, 3, 40, 40]], "labels": [[8 * 2]]}
    assert executor["calls"] == 1


def test_profile_with_cache_dir_is_refused():
    from octconv_exp.config.schema import validate
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
    from octconv_exp.models.octave import build_model

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


def _first_steps(poptorch, *overrides):
    """One training step on the double and one of plain PyTorch from the same weights and
    batch: ``(backend, model, reference, loss, reference loss)``."""
    backend, cfg = _backend(poptorch, *overrides, "ipu.device_iterations=1")
    backend.train_options = backend.make_options(train=True)
    from octconv_exp.models.octave import build_model

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
    return backend, model, reference, loss, ref_loss


@pytest.mark.parametrize("mode", ["vanilla", "octave", "multi-octave"])
def test_first_training_step_matches_plain_pytorch(poptorch, mode):
    backend, model, reference, loss, ref_loss = _first_steps(poptorch, f"conv={mode}")
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    backend.close()


@pytest.mark.parametrize("model", [[], ["model=resnet_cifar", "model.depth=8"]],
                         ids=["seed_cnn", "resnet_cifar-8"])
def test_label_smoothing_is_trained_on_the_ipu(poptorch, model):
    """PopTorch trains only its identity loss: the smoothing term must reach it (issue 26.1).
    One step on the double equals a CPU step with the smoothed cross-entropy."""
    backend, model, reference, loss, ref_loss = _first_steps(
        poptorch, *model, "trainer.label_smoothing=0.4")
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(),
                                                        reference.parameters())]
    assert max(moved) < 1e-6, moved
    backend.close()


def test_explicit_smoothed_loss_is_torchs(poptorch):
    """The IPU's explicit smoothed loss equals CrossEntropyLoss(label_smoothing), which the CPU
    keeps, for log-probabilities (the seed CNN) and logits (WithLoss)."""
    from octconv_exp.models.octave import smoothed_nll

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 10, generator=gen) * 4
    labels = torch.randint(0, 10, (64,), generator=gen)
    for eps in (0.0, 0.1, 0.4):
        expected = torch.nn.CrossEntropyLoss(label_smoothing=eps)(logits, labels)
        log_probs = torch.log_softmax(logits, dim=1)
        assert torch.allclose(smoothed_nll(log_probs, labels, eps), expected, atol=1e-6)
        on_log_probs = torch.nn.CrossEntropyLoss(label_smoothing=eps)(log_probs, labels)
        assert torch.allclose(smoothed_nll(log_probs, labels, eps), on_log_probs, atol=1e-6)
    # and it is not the unsmoothed loss
    assert not torch.allclose(smoothed_nll(log_probs, labels, 0.4),
                              torch.nn.functional.nll_loss(log_probs, labels), atol=1e-3)


def test_double_trains_only_the_identity_loss(poptorch):
    """PopTorch differentiates its one independent identity loss, not what forward returns:
    a term added after it gets no gradient; two independent losses are refused."""
    class Model(torch.nn.Module):
        def __init__(self, final):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.extra = torch.nn.Parameter(torch.ones(()))
            self.final = final

        def forward(self, x, y):
            out = torch.log_softmax(self.fc(x), dim=1)
            nll = torch.nn.functional.nll_loss(out, y)
            if self.final == "added":
                return out, nll + self.extra ** 2
            if self.final == "identity":
                return out, poptorch.identity_loss(nll + self.extra ** 2, reduction="none")
            return out, poptorch.identity_loss(self.extra ** 2, reduction="mean") + nll

    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    for final, extra_trained in (("added", False), ("identity", True)):
        model = Model(final)
        opt = poptorch.optim.SGD(model.parameters(), lr=0.5)
        training = poptorch.trainingModel(model, poptorch.Options().useIpuModel(True), opt)
        for _ in range(2):  # the loss PopTorch traced at the first call stays the loss
            _, loss = training(x, y)
        if not extra_trained:
            assert float(loss) > 1.0  # what forward returns includes the untrained term
        assert (model.extra.item() != 1.0) == extra_trained, final
    model = Model("two")
    with pytest.raises(poptorch.Error, match="Multiple independent losses"):
        poptorch.trainingModel(model, poptorch.Options().useIpuModel(True),
                               poptorch.optim.SGD(model.parameters(), lr=0.5))(x, y)


# ------------------------------------------------------------------------------ the double enforces


def test_double_refuses_a_second_training_wrap(poptorch):
    model = torch.nn.Linear(2, 2)
    poptorch.trainingModel(model, poptorch.Options())
    with pytest.raises(poptorch.PoptorchError, match="already been wrapped"):
        poptorch.trainingModel(model, poptorch.Options())


def test_ipu_backend_needs_ipus_or_the_model(poptorch, monkeypatch):
    from octconv_exp.backends.ipu import IpuBackend
    from octconv_exp.errors import UserError

    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "0")
    with pytest.raises(UserError, match="use_ipu_model"):
        IpuBackend(compose("device=ipu"))
    IpuBackend(compose("device=ipu", "ipu.use_ipu_model=true"))


def test_poptorch_ipu_model_from_the_environment_is_not_overridden(poptorch, monkeypatch):
    """useIpuModel(False) takes precedence over POPTORCH_IPU_MODEL (options.py:1567-1581): the
    backend calls it only when ipu.use_ipu_model=true, so the variable still picks the IPU
    Model on a machine without IPUs (issue 26.7)."""
    from octconv_exp.backends.ipu import IpuBackend

    monkeypatch.setenv("POPTORCH_IPU_MODEL", "1")
    cfg = compose("device=ipu", "ipu.device_iterations=1")
    backend = IpuBackend(cfg)
    backend.train_options = backend.make_options(train=True)
    assert not backend.train_options.exists("use_model")
    model = backend.build_model(num_classes=10)
    _, loss = backend.training_step(model, backend.build_optimizer(model))(
        torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert torch.isfinite(loss)
    backend.close()
    with_model = IpuBackend(compose("device=ipu", "ipu.use_ipu_model=true"))
    assert with_model.make_options(train=True).use_model is True


def test_count_correct_aligns_on_the_last_rows():
    from octconv_exp.training.loop import count_correct

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


# ------------------------------------------------------------------------------ PopTorch as it behaves
# (issue: runs inside a real Poplar SDK; each behaviour is modelled by the double, which cites
# the PopTorch 3.4 source line it follows)


@pytest.mark.slow
@pytest.mark.sdk
@pytest.mark.parametrize("mode, lr", [("vanilla", 0.05), ("octave", 0.1), ("multi-octave", 0.1)])
def test_training_accuracy_is_scored_against_its_own_labels(mode, lr, tmp_path):
    """The Async loader refills its ring-buffer slots in place: a loop that kept a step's labels
    to score later would score against other batches' labels (~10 %, chance)."""
    res, log, m = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", f"conv={mode}",
                          "alpha=0.25", *SYNTHETIC_960_FOR_IPU, "trainer.epochs=3",
                          "ipu.device_iterations=2", "ipu.output_mode=all", f"optimizer.lr={lr}",
                          env={"POPTORCH_DOUBLE_TORCH_VERSION": torch.__version__.split("+")[0]})
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["dataloaders"][0]["mode"] == "Async"
    assert m["status"] == "completed" and m["test_samples"] == 437
    # It learnt (measured: 45-54 % test, 51-56 % train in the three modes; chance is 10 %) ...
    assert m["test_accuracy"] > 35.0
    # ... and the last epoch's training accuracy, scored on every image it trained on, is
    # close to the test accuracy (against stale labels it would be near chance, 10 %).
    assert m["train_accuracy"] > 35.0
    assert abs(m["train_accuracy"] - m["test_accuracy"]) < 15.0


def test_loop_keeps_nothing_of_a_step(poptorch):
    """Overwrite every tensor a step was given or returned after the step: the epoch's
    numbers must not change."""
    from octconv_exp.training.loop import train_epoch

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 3, (4,), generator=gen)) for _ in range(7)]

    def run(clobber):
        seen = []

        def step(x, y):
            out = torch.nn.functional.one_hot(y.clone(), 3).float()  # always right
            loss = torch.tensor(0.5)
            seen.append((x, y, out, loss))
            return out, loss

        def loader():
            for x, y in batches:
                yield x.clone(), y.clone()
                if clobber:  # as the ring buffer does once the consumer moved on
                    for t in seen[-1]:
                        t.fill_(-1 if t.dtype == torch.int64 else 0.0)

        class Loader:
            def __iter__(self):
                return loader()

            def __len__(self):
                return len(batches)

        return train_epoch(step, Loader(), 1, 1, progress_bar=False, refresh_every=5)

    clean, clobbered = run(False), run(True)
    assert clean.train_accuracy == clobbered.train_accuracy == 100.0
    assert clean.train_loss == clobbered.train_loss == pytest.approx(0.5)


@pytest.mark.slow
def test_resume_of_a_finished_ipu_run_copies_nothing_back(tmp_path):
    """resume=true on a finished run: the training model never compiles, and PopTorch's
    copyWeightsToHost raises on a model without an executable."""
    # 320 training images (20 calls of 8 x 2) train the model well off its initial weights (27 %
    # of the 437 test images right, 10 % untrained): the equal accuracies are the trained ones.
    args = ["device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU, "trainer.epochs=1",
            "ipu.device_iterations=2", "dataset.train_size=320"]
    res, _, first = run_ipu(tmp_path, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    res, log, again = run_ipu(tmp_path, *args, "resume=true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert again["status"] == "completed" and again["epochs_completed"] == 1
    assert again["test_accuracy"] == first["test_accuracy"]
    assert log["executors"][0]["training"] and log["executors"][0]["calls"] == 0


@pytest.mark.slow
def test_ipu_stopped_inside_an_epoch_resumes_from_the_last_whole_one(tmp_path):
    """poptorch.DataLoader cannot start a pass part-way: a checkpoint written k steps into
    epoch 2 would call those steps "epoch 1 done" and train them twice (issue 26.3). The stop
    keeps epoch 1's checkpoint, and the resumed run ends as an uninterrupted one."""
    args = ["device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU,
            "ipu.device_iterations=2", "dataset.train_size=320"]
    # 320 / (8 x 2) = 20 steps per epoch
    whole = run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}", env={"PYTHONPATH": DOUBLE})
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "stopped"
    stopped = run_cli(*args, f"hydra.run.dir={run_dir}",
                      env={"PYTHONPATH": DOUBLE, "OCTCONV_EXP_SIGNAL_AT": "step:25"})
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    resumed = run_cli(*args, f"hydra.run.dir={run_dir}", "resume=true",
                      env={"PYTHONPATH": DOUBLE})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [line.split(",")[:3] for line in (run_dir / "epochs.csv").read_text().splitlines()]
    expected = [line.split(",")[:3]
                for line in (tmp_path / "whole" / "epochs.csv").read_text().splitlines()]
    assert rows == expected  # epoch, train_loss, train_accuracy of both epochs
    done = json.loads((run_dir / "metrics.json").read_text())
    assert done["test_accuracy"] == json.loads(
        (tmp_path / "whole" / "metrics.json").read_text())["test_accuracy"]
    assert "checkpoints whole epochs only: checkpoint of epoch 1" in stopped.stderr
    # Stopped inside the first epoch: nothing to resume from, and the line says so.
    first = run_cli(*args, f"hydra.run.dir={tmp_path / 'first'}",
                    env={"PYTHONPATH": DOUBLE, "OCTCONV_EXP_SIGNAL_AT": "step:5"})
    assert first.returncode == 130, first.stderr[-3000:]
    assert "none has ended: start the run again" in first.stderr
    assert not (tmp_path / "first" / "checkpoints" / "last.pt").exists()


def test_data_order_follows_the_seed_in_the_loader_worker(poptorch):
    from octconv_exp.backends.ipu import SeededEpochSampler
    from octconv_exp.data.loading import load_data

    def first_labels(seed, first_epoch=1, passes=1):
        backend, cfg = _backend(poptorch, "dataset=synthetic", "dataset.train_size=96",
                                "dataset.test_size=10", f"seed={seed}",
                                "ipu.device_iterations=2", "ipu.num_workers=0")
        backend.start_at_epoch(first_epoch)
        train, _ = backend.make_loaders(load_data(cfg.dataset))
        assert isinstance(train.sampler, SeededEpochSampler)
        orders = []
        for _ in range(passes):
            orders.append(torch.cat([labels.clone() for _, labels in train]).tolist())
        backend.close()
        return orders

    torch.manual_seed(123)
    a = first_labels(0, passes=2)
    torch.manual_seed(456)  # the parent's RNG does not decide the order
    assert first_labels(0, passes=2) == a
    assert a[0] != a[1]  # a new order every epoch
    assert first_labels(1)[0] != a[0]
    assert first_labels(0, first_epoch=2)[0] == a[1]  # a resumed run continues the sequence
    assert poptorch.LOG["dataloaders"][0]["mode"] == "Async"


def test_options_random_seed_does_not_reseed_the_host(poptorch):
    backend, _ = _backend(poptorch, "seed=3")
    torch.manual_seed(99)
    torch.rand(5)
    expected = torch.get_rng_state()
    opts = backend.make_options(train=True)
    assert opts.random_seed == 3  # the IPU's seed is set ...
    assert torch.equal(torch.get_rng_state(), expected)  # ... the host's stream is untouched


@pytest.mark.parametrize("overrides, variable", [
    ([], ["lr"]),  # the seed's torch.optim.SGD(lr): SGD0 on the IPU
    (["optimizer.momentum=0.9"], ["lr", "momentum"]),
    (["optimizer=adam"], ["lr"]),
    (["optimizer=adam", "optimizer.betas=[0.8,0.99]", "optimizer.weight_decay=0.1"],
     ["betas", "lr", "weight_decay"]),
    (["optimizer=adamw"], ["lr"]),
    (["optimizer=rmsprop", "optimizer.alpha=0.9"], ["alpha", "lr"]),
    (["optimizer=lamb"], ["lr"]),
    (["ipu.loss_scaling=64"], ["loss_scaling", "lr"]),
])
def test_only_what_the_config_changes_reaches_poptorch_optim(poptorch, overrides, variable):
    backend, cfg = _backend(poptorch, *overrides)
    optimizer = backend.build_optimizer(torch.nn.Linear(2, 2))
    attrs = optimizer.variable_attrs
    names = set(optimizer.defaults) | {"loss_scaling"}
    assert sorted(n for n in names if not attrs.isConstant(n)) == variable
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    # Every value is still the configured one, passed or not.
    for key, value in OmegaConf.to_container(cfg.optimizer).items():
        if key in optimizer.defaults and key != "lr":
            got = optimizer.defaults[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key


@pytest.mark.slow
@pytest.mark.sdk
def test_default_sgd_compiles_to_sgd0_and_momentum_to_sgd2(tmp_path):
    (tmp_path / "sgd0").mkdir()
    (tmp_path / "sgd2").mkdir()
    res, log, _ = run_ipu(tmp_path / "sgd0", "device=ipu", "ipu.use_ipu_model=true",
                          *SYNTHETIC_960_FOR_IPU, *SMALL_FOR_IPU, "trainer.epochs=1",
                          "ipu.device_iterations=4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["executors"][0]["optimizer"]["variable"] == ["lr"]
    assert log["executors"][0]["optimizer"]["sgd_variant"] == "SGD0"
    # A run dir of its own: a new run into a finished run's dir is refused.
    res, log, _ = run_ipu(tmp_path / "sgd2", "device=ipu", "ipu.use_ipu_model=true",
                          *SYNTHETIC_960_FOR_IPU, *SMALL_FOR_IPU, "trainer.epochs=1",
                          "ipu.device_iterations=4", "optimizer.momentum=0.9")
    assert res.returncode == 0, res.stderr[-3000:]
    assert log["executors"][0]["optimizer"]["sgd_variant"] == "SGD2"


@pytest.mark.slow
def test_checkpoints_do_not_cross_between_ipu_and_cpu(tmp_path):
    cpu_dir, ipu_dir = tmp_path / "cpu", tmp_path / "ipu"
    cpu_dir.mkdir()
    ipu_dir.mkdir()
    args = [*SYNTHETIC_960_FOR_IPU, *SMALL_FOR_IPU, "trainer.epochs=1", "ipu.use_ipu_model=true",
            "ipu.device_iterations=2"]
    res, _, _ = run_ipu(cpu_dir, "device=cpu", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    res, _, _ = run_ipu(ipu_dir, "device=ipu", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    # An IPU checkpoint continued on the CPU, and the other way round: one line each, exit 2,
    # the run dir they name untouched.
    for there, here in (("cpu", "ipu"), ("ipu", "cpu")):
        ckpt = (cpu_dir if there == "cpu" else ipu_dir) / "run" / "checkpoints" / "last.pt"
        before = ckpt.read_bytes()
        out = tmp_path / f"resume-{there}-{here}"
        out.mkdir()
        res, _, m = run_ipu(out, f"device={here}", *args, "trainer.epochs=2", "resume=true",
                            f"ckpt_path={ckpt}")
        assert res.returncode == 2, res.stderr[-3000:]
        assert res.stderr.count("\n") == 1
        assert f"device={there}" in res.stderr and f"device={here}" in res.stderr
        assert "train=false" in res.stderr
        assert ckpt.read_bytes() == before
    # What the line suggests works: the IPU's weights evaluated on the CPU, and vice versa.
    res, _, m = run_ipu(tmp_path / "eval", "device=cpu", *args, "train=false",
                        f"ckpt_path={ipu_dir / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["status"] == "evaluated" and m["test_samples"] == 57  # every test image


@pytest.mark.slow
@pytest.mark.sdk
def test_poptorch_built_for_another_torch(tmp_path):
    env = {"POPTORCH_DOUBLE_TORCH_VERSION": "1.13.1"}
    res, _, _ = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU,
                        env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert "torch==1.13.1" in res.stderr and torch.__version__.split("+")[0] in res.stderr
    res, log, m = run_ipu(tmp_path, "device=auto", *SYNTHETIC_960_FOR_IPU, *SMALL_FOR_IPU,
                          "trainer.epochs=1", ipus=1, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["device"] == "cpu"
    assert "PopTorch is installed but unusable" in res.stdout + res.stderr


@pytest.mark.slow
def test_replicas_ask_for_as_many_ipus(tmp_path):
    res, log, m = run_ipu(tmp_path, "device=ipu", *SYNTHETIC_960_FOR_IPU, "trainer.epochs=1",
                          "ipu.replicas=2", ipus=1)
    assert res.returncode == 2 and "ipuHardwareIsAvailable(2)" in res.stderr
    res, log, m = run_ipu(tmp_path, "device=auto", *SYNTHETIC_960_FOR_IPU, *SMALL_FOR_IPU,
                          "trainer.epochs=1", "ipu.replicas=2", ipus=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["device"] == "cpu" and "ipuHardwareIsAvailable(2)" in log["events"]


def test_replicas_must_be_a_power_of_two(poptorch, monkeypatch):
    """PopTorch refuses 3 IPUs per process without autoRoundNumIPUs (CompilerImpl.cpp:707;
    the double too): the config says so before anything starts (issue 26.5)."""
    from octconv_exp.config.schema import validate
    from octconv_exp.errors import ConfigError

    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "4")
    opts = poptorch.Options().replicationFactor(3)
    with pytest.raises(poptorch.Error, match="must reserve a minimum of 4"):
        poptorch.inferenceModel(torch.nn.Linear(2, 2), opts)(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match=r"ipu.replicas=3: must be a power of 2"):
        validate(compose("device=ipu", "ipu.replicas=3"), check_environment=False)
    for replicas in (1, 2, 4):
        validate(compose("device=ipu", f"ipu.replicas={replicas}"), check_environment=False)


def test_ipu_model_with_replicas_and_drop_last_false_are_refused():
    from octconv_exp.config.schema import validate
    from octconv_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="ipu.replicas=2: the IPU Model"):
        validate(compose("device=ipu", "ipu.use_ipu_model=true", "ipu.replicas=2"),
                 check_environment=False)
    with pytest.raises(ConfigError, match="trainer.drop_last=false"):
        validate(compose("device=ipu", "trainer.drop_last=false"), check_environment=False)
    validate(compose("device=cpu", "trainer.drop_last=false"), check_environment=False)


@pytest.mark.slow
def test_synthetic_data_reports_throughput_not_accuracy(tmp_path):
    res, log, m = run_ipu(tmp_path, "device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU,
                          "trainer.epochs=1", "ipu.synthetic_data=true",
                          "dataset.train_size=400")  # one combined batch of 8 x 50 (the default)
    assert res.returncode == 0, res.stderr[-3000:]
    assert m["test_accuracy"] is None and m["train_accuracy"] is None
    assert m["test_samples"] == 437 and m["train_images_per_second"] > 0
    assert all(e["options"]["popart"]["syntheticDataMode"] == 2 for e in log["executors"])
    # Nor any other score of the device's own data: no loss, no matrix.
    assert (m["test_loss"], m["test_top5_accuracy"], m["test_per_class_accuracy"]) == (None,) * 3
    assert not (tmp_path / "run" / "confusion_matrix.csv").exists()


@pytest.mark.slow
def test_evaluate_only_starts_no_training_loader(tmp_path):
    # 320 training images (20 calls of 8 x 2) train the model well off its initial weights (27 %
    # of the 437 test images right, 10 % untrained): the equal accuracies are the checkpoint's.
    args = ["device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU, "trainer.epochs=1",
            "ipu.device_iterations=2", "dataset.train_size=320"]
    res, _, trained = run_ipu(tmp_path, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "eval"
    out.mkdir()
    res, log, m = run_ipu(out, *args, "train=false", f"ckpt_path={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [d["dataset_size"] for d in log["dataloaders"]] == [420]  # the test loader only
    assert [e["training"] for e in log["executors"]] == [False]
    assert m["test_accuracy"] == trained["test_accuracy"]


def test_profiling_keeps_the_users_engine_options(poptorch, tmp_path, monkeypatch):
    """Options.enableProfiling (3.3 and 3.4): the report's engine options, with
    debug.allowOutOfMemory; POPLAR_ENGINE_OPTIONS stays the user's."""
    monkeypatch.setenv("POPLAR_ENGINE_OPTIONS", '{"debug.x": "1"}')
    backend, _ = _backend(poptorch, "conv=octave", "ipu.device_iterations=2")
    model = backend.build_model(num_classes=10)
    backend.profile(model, backend.build_optimizer(model), str(tmp_path / "prof"), (3, 32, 32),
                    10)
    assert os.environ["POPLAR_ENGINE_OPTIONS"] == '{"debug.x": "1"}'  # left as the user set it
    (record,) = poptorch.LOG["executors"]
    engine = record["options"]["popart"]["engineOptions"]
    assert engine == {"autoReport.directory": str(tmp_path / "prof"), "autoReport.all": "true",
                      "debug.allowOutOfMemory": "true"}
    backend.close()


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_leaves_the_async_workers_loading(tmp_path):
    """A terminal's Ctrl-C reaches PopTorch's Async workers too (issue 26.2): PopTorch's worker
    exits 0 on KeyboardInterrupt (_dataloader.py:258-278), and the host then waits for it
    forever, or fails to command it. The signal at the last step of epoch 1 is followed by the
    validation pass: its loader's worker must still be there, and the run end at epoch 1's
    checkpoint with exit 130."""
    import signal
    import subprocess

    from conftest import REPO, popen_python

    run_dir = tmp_path / "run"
    args = ["device=ipu", "ipu.use_ipu_model=true", *SYNTHETIC_960_FOR_IPU,
            "ipu.device_iterations=2", "dataset.train_size=360", "dataset.val_size=40",
            f"hydra.run.dir={run_dir}"]
    # (360 - 40) / (8 x 2) = 20 steps per epoch
    env = dict(PYTHONPATH=DOUBLE, OCTCONV_EXP_SIGNAL_AT="step:20", OCTCONV_EXP_SIGNAL_GROUP="1")
    proc = popen_python(os.path.join(REPO, "run.py"), *args, cwd=REPO, env=env,
                        start_new_session=True)  # its own group: the signal spares pytest
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run hung after Ctrl-C")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "data fetcher" not in err, err[-3000:]
    assert "at epoch 2, step 0; checkpoint in" in err, err[-3000:]
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert len((run_dir / "epochs.csv").read_text().splitlines()) == 2  # header, epoch 1


def test_ipu_loaders_send_uint8_and_yield_the_normalised_batches(poptorch):
    """The data sets reach PopTorch's worker as uint8 (in /dev/shm: a quarter of float32's
    bytes, issue 26.6) and are normalised per batch: the batches are the numbers the whole
    set normalised at once gave."""
    from octconv_exp.backends.ipu import IpuBackend
    from octconv_exp.data.datasets import Normalise
    from octconv_exp.data.loading import load_data

    cfg = compose("device=ipu", "ipu.use_ipu_model=true", "dataset=synthetic",
                  "dataset.train_size=64", "dataset.test_size=37", "trainer.batch_size=8",
                  "trainer.test_batch_size=10", "ipu.num_workers=0",
                  "ipu.device_iterations=1")
    data = load_data(cfg.dataset)
    backend = IpuBackend(cfg)
    train, test = backend.make_loaders(data)
    normalise = Normalise(data.mean, data.std)
    images, labels = data.train.images, data.train.labels
    order = train.sampler.order(1)
    expected = normalise(images)[order]
    seen = torch.cat([batch[0].clone() for batch in train])
    assert seen.dtype == torch.float32 and torch.equal(seen, expected[:len(seen)])
    test_images = torch.cat([batch[0].clone() for batch in test])
    assert torch.equal(test_images, normalise(data.test.images))
    pixels = images.numel()
    record = poptorch.LOG["dataloaders"]
    assert images.dtype == torch.uint8
    # the uint8 images, the int64 labels and the collate function's 2 x 3 float32 constants
    assert record[0]["worker_shared_bytes"] == pixels + labels.numel() * 8 + 24
    assert record[1]["worker_shared_bytes"] < 4 * data.test.images.numel()
    backend.close()
