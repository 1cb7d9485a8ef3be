"""speed.compile=auto: the decision rule, and the training step that times its first eager
steps and then compiles (or not) for the rest of the run."""
import pytest
import torch

from conftest import compose_config
from octconv_exp.backends import native
from octconv_exp.backends.native import (PROBE_SKIP, PROBE_STEPS, NativeBackend,
                                         compile_decision)


def test_explicit_settings_win():
    assert compile_decision("true", "cpu") == (True, "speed.compile=true")
    assert compile_decision("False", "cuda") == (False, "speed.compile=false")


@pytest.mark.parametrize("kwargs, reason", [
    (dict(torch_version="2.0.1+cpu"), "off on torch 2.0.1"),
    (dict(deterministic=True), "deterministic"),
    (dict(device_type="cuda", measured={"cpu": {"seed_cnn/vanilla": (1.0, 0.5)}}),
     "not been measured for seed_cnn/vanilla on cuda"),
    (dict(conv="octave", measured={"cpu": {"seed_cnn/vanilla": (1.0, 0.5)}}),
     "not been measured for seed_cnn/octave"),
    (dict(measured={"cpu": {"seed_cnn/vanilla": (12.0, 0.99)}}), "measured 0.99x"),
])
def test_auto_is_off_where_compile_cannot_pay(kwargs, reason):
    kwargs = {"device_type": "cpu", "steps_left": 10**6, "eager_step_s": 1.0,
              "torch_version": "2.5.0", **kwargs}
    on, why = compile_decision("auto", **kwargs)
    assert on is False and reason in why


@pytest.mark.parametrize("model", ["seed_cnn", "resnet_cifar-20"])
@pytest.mark.parametrize("conv", ["vanilla", "octave", "multi-octave"])
def test_auto_is_off_on_this_cpu_as_measured(model, conv):
    on, why = compile_decision("auto", "cpu", model=model, conv=conv, steps_left=10**6,
                               eager_step_s=1.0, torch_version="2.14.1")
    assert on is False and f"{model}/{conv} measured" in why


def test_auto_weighs_the_saving_over_the_run_against_the_compilation():
    table = {"cuda": {"seed_cnn/vanilla": (30.0, 0.6)}}  # 30 s to compile, 40 % shorter steps
    # 1000 steps x 0.1 s x 0.4 = 40 s saved > 30 s
    on, why = compile_decision("auto", "cuda", steps_left=1000, eager_step_s=0.1,
                               measured=table, torch_version="2.5.0")
    assert on is True and "40 s > 30 s" in why
    on, why = compile_decision("auto", "cuda", steps_left=500, eager_step_s=0.1,
                               measured=table, torch_version="2.5.0")
    assert on is False and "20 s <= 30 s" in why
    assert compile_decision("auto", "cuda", measured=table, torch_version="2.5.0")[0] is None


class _Recorder(torch.nn.Module):
    """What torch.compile returned: the model, with each call counted."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, *args):
        self.calls.append("compiled")
        return self.model(*args)


@pytest.mark.parametrize("steps_left, compiled", [(10**6, True), (PROBE_SKIP + PROBE_STEPS, False),
                                                  (None, False)])
def test_training_step_times_eager_steps_then_decides(monkeypatch, steps_left, compiled):
    from octconv_exp.backends import distributed

    calls, compiles, agreed = [], [], []

    def max_over_ranks(value):  # data-parallel ranks decide on the slowest rank's time
        agreed.append(value)
        return value

    monkeypatch.setattr(distributed, "max_over_ranks", max_over_ranks)

    def fake_compile(model):
        compiles.append(model)
        return _Recorder(model, calls)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch, "__version__", "2.5.0")  # also where the tests run torch 2.0.1
    # A device where compiled steps measured twice as fast after 1 ms of compilation.
    monkeypatch.setattr(native, "COMPILE_MEASURED", {"cpu": {"seed_cnn/multi-octave": (0.001, 0.5)}})
    cfg = compose_config("conv=multi-octave", "speed.compile=auto")
    backend = NativeBackend(cfg, "cpu")
    assert backend.compile is None and "deciding" in backend.compile_reason
    model = backend.build_model(10)
    optimizer = backend.build_optimizer(model)
    if steps_left is not None:  # None: a caller that never said how long the run is
        backend.plan(steps_left)
    step = backend.training_step(model, optimizer)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    probe = PROBE_SKIP + PROBE_STEPS
    for _ in range(probe):
        step(x, y)
    assert compiles == [] and calls == []
    for _ in range(3):
        step(x, y)
    assert backend.compile is compiled
    assert backend.compile_reason.startswith("auto: " + ("on" if compiled else "off"))
    assert len(agreed) == 1 and agreed[0] > 0  # the median eager step, in microseconds
    if steps_left is None:
        assert "run length unknown" in backend.compile_reason
    assert compiles == ([model] if compiled else []) and len(calls) == (3 if compiled else 0)
    # Inference after training uses the same decision.
    backend.inference_step(model)(x)
    assert len(calls) == (4 if compiled else 0)


def test_auto_backend_on_this_torch():
    """The backend's own decision on the torch these tests run: off on this CPU (measured
    slower) on the newest torch, and off on torch 2.0.1 whatever was measured."""
    backend = NativeBackend(compose_config("speed.compile=auto"), "cpu")
    assert backend.compile is False
    expected = "off on torch" if torch.__version__.startswith("2.0.") else "measured"
    assert expected in backend.compile_reason


def test_data_parallel_training_and_inference_compile_apart(monkeypatch):
    """Under torchrun with compile on, training steps run the compiled DDP wrapper and
    inference the compiled model itself: a DDP forward would broadcast buffers (a collective)
    while each rank evaluates its own images."""
    from octconv_exp.backends import distributed

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or ("compiled", m))
    monkeypatch.setattr(distributed, "WORLD", distributed.World(world_size=2))
    monkeypatch.setattr(distributed, "wrap", lambda model, device: ("ddp", model))
    backend = NativeBackend(compose_config("speed.compile=true"), "cpu")
    model = backend.build_model(10)
    train = backend.runnable(model, training=True)
    infer = backend.runnable(model)
    assert train == ("compiled", ("ddp", model)) and infer == ("compiled", model)
    assert backend.runnable(model, training=True) is train and backend.runnable(model) is infer
    assert len(compiled) == 2


def test_close_lets_go_of_the_ddp_wrappers_before_the_group_is_destroyed(monkeypatch):
    """The DDP wrappers' reducers hold the process group: close() drops them, so that
    distributed.teardown's collection frees the group while the interpreter is whole."""
    from octconv_exp.backends import distributed

    monkeypatch.setattr(torch, "compile", lambda m: ("compiled", m))
    monkeypatch.setattr(distributed, "WORLD", distributed.World(world_size=2))
    monkeypatch.setattr(distributed, "wrap", lambda model, device: ("ddp", model))
    backend = NativeBackend(compose_config("speed.compile=true"), "cpu")
    model = backend.build_model(10)
    backend.runnable(model, training=True)
    assert backend.data_parallel is not None and backend.compiled_data_parallel is not None
    backend.close()
    assert backend.data_parallel is None and backend.compiled_data_parallel is None
