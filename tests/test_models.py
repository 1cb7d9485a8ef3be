"""The model group: every model in every conv mode, on the CPU and on the PopTorch double;
your own model and data set through _target_; input sizes."""
import json
import os

import pytest
import torch

from conftest import compose_config as compose, DOUBLE, read_metrics, run_cli, write_image_folder

USER_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "user_code")
MODELS = {  # tiny versions of each family
    "seed_cnn": ["model=seed_cnn"],
    "resnet_cifar": ["model=resnet_cifar", "model.depth=8"],
    "resnet_imagenet": ["model=resnet_imagenet", "model.depth=26", "model.width=1"],
}
MODES = ("vanilla", "octave", "multi-octave")




@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards: one thread is faster on a shared 2-core machine, and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("mode", MODES)
def test_ipu_model_equals_the_cpu_model_and_groups_multi_octave(poptorch, family, mode):
    """On the double: the IPU-wrapped model computes what the CPU model (multi-octave: the
    fused implementation) computes, its first training step equals plain PyTorch's, and
    multi-octave runs every octave convolution of the family inside a poptorch.MultiConv."""
    from octconv_exp.backends.ipu import IpuBackend
    from octconv_exp.models.octave import build_model

    cfg = compose("device=ipu", "ipu.use_ipu_model=true", "ipu.device_iterations=1",
                  f"conv={mode}", "alpha=0.25", *MODELS[family])
    backend = IpuBackend(cfg)
    backend.train_options = backend.make_options(train=True)
    backend.test_options = backend.make_options(train=False)
    scoped = []  # every octave convolution the model enters a MultiConv for
    configure = backend.multi_conv_scope
    backend.multi_conv_scope = lambda conv: (scoped.append(conv), configure(conv))[1]
    torch.manual_seed(0)
    model = backend.build_model(num_classes=10)
    cpu = build_model(cfg)
    cpu.load_state_dict(model.state_dict())
    reference = build_model(cfg)
    reference.load_state_dict(model.state_dict())
    # ResNet-26 at 64x64: at 32x32 its last stage is 1x1, where training-mode BatchNorm over
    # 8 values amplifies float32 rounding (octave vs fused) to ~1e-2 in the gradients.
    size = 64 if family == "resnet_imagenet" else 32
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))

    start = [p.detach().clone() for p in reference.parameters()]
    optimizer = backend.build_optimizer(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=cfg.optimizer.lr)
    _, loss = backend.training_step(model, optimizer)(x, y)
    reference.train()
    _, ref_loss = reference(x, y)
    ref_loss.backward()
    ref_opt.step()
    assert torch.allclose(loss, ref_loss.detach(), atol=1e-5)
    pairs = list(zip(model.parameters(), reference.parameters(), start))
    if family != "resnet_imagenet":
        for p, q, _ in pairs:
            assert torch.allclose(p, q, atol=1e-5)
    else:
        # ResNet-26's training-mode BatchNorm over few values (2x2 in its last stage) amplifies
        # float32 rounding (octave vs fused multi-octave), and the CPU's vector width decides
        # how much: with AVX-512 the weights agreed within 1e-5, with AVX2 they differ by up to
        # 1e-3. Compared as a whole, the two steps agree within 2 % (a wrong gradient differs
        # by the whole step).
        differs = torch.cat([(p - q).detach().flatten() for p, q, _ in pairs]).norm()
        step = torch.cat([(q - p0).detach().flatten() for _, q, p0 in pairs]).norm()
        assert differs <= 0.02 * step, (differs.item(), step.item())

    backend.finish_training(model)
    cpu.load_state_dict(model.state_dict())
    cpu.eval()
    out = backend.inference_step(model)(x.repeat(10, 1, 1, 1))
    assert torch.allclose(out, cpu(x.repeat(10, 1, 1, 1)), atol=1e-4)
    octave_convs = {id(m) for m in model.modules() if type(m).__name__ == "OctConv2d"}
    groups = poptorch.LOG["multiconv"]  # the distinct MultiConv configurations used
    if mode == "multi-octave":
        assert octave_convs and {id(c) for c in scoped} == octave_convs
        assert {g["convs"] for g in groups} <= {2, 3, 4} and groups
    else:
        assert groups == [] and scoped == []
    backend.close()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_flops_and_parameters_are_reported_for_every_family(family):
    from octconv_exp.models.octave import build_model, count_parameters
    from octconv_exp.training.runner import flops_summary

    for mode, alpha in (("vanilla", 0.5), ("octave", 0.5), ("multi-octave", 0.25)):
        cfg = compose(f"conv={mode}", f"alpha={alpha}", *MODELS[family])
        f = flops_summary(cfg, 10, (3, 32, 32))
        assert f["flops_per_image"] > 0 and count_parameters(build_model(cfg)) > 0
        if mode == "vanilla":
            assert f["flops_ratio"] == 1.0 and f["flops_ratio_theoretical"] == 1.0
        else:
            assert 0.2 < f["flops_ratio"] < 0.95
            # The theory ignores integer channel splits and odd sizes only.
            assert f["flops_ratio_theoretical"] == pytest.approx(f["flops_ratio"], rel=0.03)


def test_the_seed_model_refuses_other_input_sizes_in_one_line():
    from octconv_exp.models.octave import build_model, check_input_size

    model = build_model(compose("conv=octave"))
    check_input_size(model, (3, 32, 32))
    with pytest.raises(ValueError, match="takes 32x32 images only .* 48x48"):
        check_input_size(model, (3, 48, 48))
    resnet = build_model(compose("model=resnet_cifar", "conv=octave"))
    check_input_size(resnet, (3, 48, 48))
    with pytest.raises(ValueError, match="at least 8x8"):
        check_input_size(resnet, (3, 6, 6))


def test_a_plain_classifier_gets_its_loss_inside_the_model():
    from octconv_exp.models.octave import WithLoss, build_model

    cfg = compose("model=resnet_cifar", "model.depth=8", "trainer.label_smoothing=0.1")
    model = build_model(cfg)
    assert isinstance(model, WithLoss)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    out, loss = model(x, y)
    assert out.shape == (3, 10)
    expected = torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1)
    assert torch.allclose(loss, expected)
    seed = build_model(compose("trainer.label_smoothing=0.1"))
    out, loss = seed(x, y)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1))


def test_old_checkpoints_without_a_model_key_are_the_seed_model():
    from octconv_exp.training.checkpoint import check_identity
    from octconv_exp.models.octave import model_name

    cfg = compose("conv=octave", "alpha=0.25")
    saved = {"conv": "octave", "alpha": 0.25, "expansion": 1, "num_classes": 10}
    check_identity(saved, cfg, 10, "old.pt")  # no "model" key: nothing to compare
    assert model_name(cfg) == "seed_cnn"
    with pytest.raises(Exception, match="model=seed_cnn; this run has model=resnet_cifar-20"):
        check_identity(dict(saved, model="seed_cnn"), compose("model=resnet_cifar", "conv=octave",
                                                               "alpha=0.25"), 10, "x.pt")


def test_a_user_model_is_recorded_by_its_class_or_the_name_its_user_gives():
    from octconv_exp.sweeps import sweep
    from octconv_exp.models.octave import model_name

    # The seed_cnn YAML's name stays when only _target_ is overridden: not the class that ran.
    user = compose("model._target_=my_research.TinyNet")
    assert user.model.name == "seed_cnn" and model_name(user) == "my_research.TinyNet"
    assert model_name(compose("model._target_=my_research.TinyNet", "model.name=tiny")) == "tiny"
    assert model_name(compose("model._target_=my_research.TinyNet", "model.name=null")) == \
        "my_research.TinyNet"
    assert model_name(compose("model=resnet_cifar", "model._target_=my_research.TinyNet",
                              "model.depth=8")) == "my_research.TinyNet-8"
    assert model_name(compose()) == "seed_cnn"
    assert model_name(compose("model=resnet_cifar", "model.width=2")) == "resnet_cifar-20-w2"
    # A sweep's plan (jobs.yaml) and a missing job's row say what metrics.json says.
    for cfg in (user, compose("model=resnet_cifar")):
        assert sweep.reported_model_name(cfg.model) == model_name(cfg)
    assert sweep.reported_model_name({"name": "wide_cnn"}) == "wide_cnn"


def test_checkpoints_that_named_a_user_model_by_the_old_rule_still_load():
    from octconv_exp.training.checkpoint import check_identity, identity

    cfg = compose("model._target_=my_research.TinyNet")
    saved = identity(cfg, 10)
    assert saved["model"] == "my_research.TinyNet"
    check_identity(saved, cfg, 10, "new.pt")
    check_identity(dict(saved, model="seed_cnn"), cfg, 10, "old.pt")  # the YAML's leftover
    unnamed = compose("model._target_=my_research.TinyNet", "model.name=null")
    check_identity(dict(saved, model="TinyNet"), unnamed, 10, "old.pt")  # the bare class name
    with pytest.raises(Exception, match="model=resnet_cifar-20; this run has "
                                        "model=my_research.TinyNet"):
        check_identity(dict(saved, model="resnet_cifar-20"), cfg, 10, "x.pt")


@pytest.mark.slow
def test_a_sweep_of_a_user_model_and_the_seed_cnn_keeps_them_apart(tmp_path):
    """Log, metrics.json, the sweep's plan and report, and the MLflow tags name the class."""
    mlflow = pytest.importorskip("mlflow")
    sweep_dir = tmp_path / "sweep"
    res = run_cli("-m", "model._target_=my_research.TinyNet,octconv_exp.models.octave.ClassificationModel",
                  "dataset=synthetic", "dataset.train_size=64", "dataset.test_size=16",
                  "trainer.epochs=1", "trainer.progress_bar=false", "logger=mlflow",
                  f"hydra.sweep.dir={sweep_dir}", cwd=str(tmp_path),
                  env={"PYTHONPATH": USER_CODE})
    assert res.returncode == 0, res.stderr[-3000:]
    import csv
    import glob

    from octconv_exp.sweeps import sweep

    runs = {}
    for path in glob.glob(str(sweep_dir / "**" / "metrics.json"), recursive=True):
        run_dir = os.path.dirname(path)
        runs[read_metrics(run_dir)["model"]] = run_dir
    assert sorted(runs) == ["my_research.TinyNet", "seed_cnn"]
    with open(os.path.join(runs["my_research.TinyNet"], "run.log")) as f:
        assert "Model: my_research.TinyNet conv=vanilla" in f.read()
    with open(sweep_dir / "summary.csv") as f:
        assert sorted(r["model"] for r in csv.DictReader(f)) == ["my_research.TinyNet", "seed_cnn"]
    plan, problems = sweep.read_plan(str(sweep_dir))
    assert problems == []
    assert sorted(e["config"]["model"] for e in plan) == ["my_research.TinyNet", "seed_cnn"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    df = mlflow.search_runs(experiment_names=["octconv-exp"])
    jobs = df[df["tags.kind"] != "sweep report"] if "tags.kind" in df else df
    assert sorted(jobs["tags.model"]) == ["my_research.TinyNet", "seed_cnn"]


@pytest.mark.slow
@pytest.mark.sdk
@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_family_trains_through_run_py(family, tmp_path):
    res = run_cli(*MODELS[family], "conv=multi-octave", "alpha=0.25", "dataset=synthetic",
                  "dataset.train_size=160", "dataset.test_size=40", "trainer.epochs=1",
                  "trainer.progress_bar=false", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(tmp_path)
    name = {"seed_cnn": "seed_cnn", "resnet_cifar": "resnet_cifar-8",
            "resnet_imagenet": "resnet_imagenet-26"}[family]
    assert (m["status"], m["model"], m["image_size"], m["test_samples"]) == (
        "completed", name, [32, 32], 40)
    assert 0 < m["flops_ratio"] < 1 and m["params"] > 0
    assert f"Model: {name} conv=multi-octave" in res.stdout + res.stderr


@pytest.mark.slow
def test_a_resnet_on_the_ipu_double_and_a_resumed_resnet(tmp_path):
    log = tmp_path / "poptorch_log.json"
    args = ["model=resnet_cifar", "model.depth=8", "conv=multi-octave", "alpha=0.5",
            "dataset=synthetic", "dataset.train_size=192", "dataset.test_size=40",
            "trainer.progress_bar=false", "ipu.num_workers=0", "ipu.device_iterations=2"]
    res = run_cli(*args, "device=ipu", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'ipu'}",
                  env={"PYTHONPATH": DOUBLE, "POPTORCH_DOUBLE_LOG": str(log),
                       "POPTORCH_DOUBLE_IPUS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(tmp_path / "ipu")
    assert (m["device"], m["model"], m["test_samples"]) == ("ipu", "resnet_cifar-8", 40)
    assert json.loads(log.read_text())["multiconv"]
    # Resume takes the model from the run's own record, and refuses another depth.
    cpu_args = [a for a in args if not a.startswith("ipu.")]
    res = run_cli(*cpu_args, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'cpu'}")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("resume=true", "trainer.epochs=2", "trainer.progress_bar=false",
                  f"hydra.run.dir={tmp_path / 'cpu'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(tmp_path / "cpu")["epochs_completed"] == 2
    res = run_cli("resume=true", "model.depth=14", "trainer.epochs=3",
                  f"hydra.run.dir={tmp_path / 'cpu'}")
    assert res.returncode == 2 and "model.depth" in res.stderr


@pytest.mark.slow
@pytest.mark.sdk
def test_your_own_model_and_data_set_through_target(tmp_path):
    """Defined outside the package (tests/user_code/my_research.py), named by _target_ only."""
    res = run_cli("model._target_=my_research.TinyNet", "model.name=tiny", "+model.hidden=6",
                  "dataset=custom", "dataset._target_=my_research.Stripes", "+dataset.size=96",
                  "dataset.augment=false", "trainer.epochs=2", "trainer.progress_bar=false",
                  "trainer.batch_size=16", f"hydra.run.dir={tmp_path}",
                  env={"PYTHONPATH": USER_CODE})
    assert res.returncode == 0, res.stderr[-3000:]
    m = read_metrics(tmp_path)
    assert (m["status"], m["model"], m["dataset"], m["image_size"]) == (
        "completed", "tiny", "custom", [24, 24])
    assert m["params"] == 3 * 6 * 9 + 6 + 2 * 6 + 6 * 16 * 4 + 4  # conv, BN, head: 4 classes
    assert m["test_samples"] == 96 and m["flops_ratio"] == 1.0
    assert m["flops_ratio_theoretical"] is None  # a model whose layers we cannot read
    # An octave conv mode needs a model that takes conv_mode: refused, not trained vanilla.
    res = run_cli("model._target_=my_research.TinyNet", "conv=octave", "dataset=synthetic",
                  f"hydra.run.dir={tmp_path / 'b'}", env={"PYTHONPATH": USER_CODE})
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "takes no conv_mode argument" in res.stderr


@pytest.mark.slow
def test_image_folders_of_any_size_for_resnets_and_not_for_the_seed_model(tmp_path):
    root = write_image_folder(str(tmp_path / "imgs"), size=50)
    common = ["dataset=image_folder", f"dataset.root={root}", "dataset.image_size=40",
              "trainer.epochs=1", "trainer.progress_bar=false", "trainer.batch_size=6"]
    res = run_cli(*common, "model=resnet_cifar", "model.depth=8", "conv=octave",
                  f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert read_metrics(tmp_path / "r")["image_size"] == [40, 40]
    res = run_cli(*common, f"hydra.run.dir={tmp_path / 's'}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "model=seed_cnn takes 32x32 images only" in res.stderr
    assert read_metrics(tmp_path / "s")["status"] == "failed"


@pytest.mark.parametrize("preset, depth", [("resnet20_cifar10", 20), ("resnet56_cifar10", 56),
                                           ("resnet20_octave", 20), ("resnet56_octave", 56)])
def test_recipes_are_he_et_al_s(preset, depth):
    from octconv_exp.config.schema import validate

    cfg = compose(f"experiment={preset}")
    validate(cfg, check_environment=False)
    assert (cfg.model.name, cfg.model.depth, cfg.dataset.name, cfg.dataset.augment) == (
        "resnet_cifar", depth, "cifar10", True)
    o, t = cfg.optimizer, cfg.trainer
    assert (o.name, o.lr, o.momentum, o.weight_decay, t.batch_size) == ("sgd", 0.1, 0.9, 1e-4, 128)
    # /10 at 50% and 75% of 164 epochs (He et al.'s 32k and 48k of 64k iterations)
    assert list(cfg.scheduler.milestones) == [82, 123] and t.epochs == 164


def test_warmup_multistep_schedule_and_its_exact_resume():
    from octconv_exp.training.schedules import WarmupMultiStepLR

    def run(epochs, state=None):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = WarmupMultiStepLR(opt, milestones=[4, 6], gamma=0.1, warmup_epochs=2,
                                  warmup_factor=0.2)
        if state is not None:  # as the runner restores a checkpoint
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        lrs = []
        for _ in range(epochs):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs, (opt.state_dict(), sched.state_dict())

    lrs, _ = run(8)
    assert lrs == pytest.approx([0.02, 0.06, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    first, state = run(3)
    rest, _ = run(5, state)
    assert first + rest == pytest.approx(lrs)
    with pytest.raises(ValueError, match="milestones must be increasing"):
        WarmupMultiStepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
                          milestones=[6, 4])
