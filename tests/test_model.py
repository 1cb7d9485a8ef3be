"""The seed's model, layer for layer, and the fused octave convolution against octconv."""
import itertools

import octconv
import pytest
import torch

from octconv_exp.models.octave import (ClassificationModel, FusedOctaveBlock, FusedOctConv2d,
                               OctaveBlock, count_parameters, octave_branches)

MODES = ("vanilla", "octave", "multi-octave")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", [0.0, 0.125, 0.25, 0.5, 0.75])
def test_output_shapes_and_loss(mode, alpha):
    torch.manual_seed(0)
    model = ClassificationModel(mode, alpha, expansion=1)
    x = torch.randn(5, 3, 32, 32)
    labels = torch.randint(0, 10, (5,))
    out = model(x)
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(5), atol=1e-5)  # log-probabilities
    out2, loss = model(x, labels)
    assert torch.allclose(out, out2)
    assert torch.allclose(loss, torch.nn.functional.nll_loss(out, labels))


@pytest.mark.parametrize("alpha", [0.0, 0.125, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("expansion", [1, 2, 4])
def test_parameter_counts(alpha, expansion):
    counts = {mode: count_parameters(ClassificationModel(mode, alpha, expansion)) for mode in MODES}
    assert counts["vanilla"] == counts["octave"] == counts["multi-octave"]
    if expansion == 1:
        assert counts["vanilla"] == 12346


def test_seed_layer_structure():
    model = ClassificationModel("octave", 0.5, 1)
    convs = [b.octconv for b in model.convlayers]
    assert [(c.alpha_in, c.alpha_out) for c in convs] == [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0)]
    assert [c.out_channels for c in convs] == [{"high": 8, "low": 8}, {"high": 16, "low": 16},
                                               {"high": 16, "low": 0}]
    assert all(type(c) is octconv.OctConv2d for c in convs)
    assert isinstance(model.convlayers[0].low_seq[0], torch.nn.BatchNorm2d)
    assert not hasattr(model.convlayers[2], "low_seq")
    fused = ClassificationModel("multi-octave", 0.5, 1)
    assert all(type(b.octconv) is FusedOctConv2d for b in fused.convlayers)
    assert all(type(b) is FusedOctaveBlock for b in fused.convlayers)
    # The same state dict as the seed's block order.
    assert list(fused.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("alpha", [(0.0, 0.5), (0.5, 0.5), (0.5, 0.0), (0.25, 0.75)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_block_pools_before_relu_with_the_same_values_and_gradients(alpha, channels_last):
    """BatchNorm -> MaxPool -> ReLU gives bit for bit the values and gradients of the seed's
    BatchNorm -> ReLU -> MaxPool, ties and all-negative windows included."""
    torch.manual_seed(0)
    fused = FusedOctaveBlock(8, 8, alpha)
    seed_order = OctaveBlock(8, 8, alpha, conv_cls=FusedOctConv2d)
    seed_order.load_state_dict(fused.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused.to(memory_format=fmt)
    seed_order.to(memory_format=fmt)
    x = _inputs(8, alpha[0], 8)
    x = tuple(t.detach().round().contiguous(memory_format=fmt) for t in _flat(x))  # ties
    with torch.no_grad():  # a shift that leaves whole windows negative after BatchNorm
        for block in (fused, seed_order):
            block.high_seq[0].bias.fill_(-0.8)
    x_a = tuple(t.clone().requires_grad_() for t in x)
    x_b = tuple(t.clone().requires_grad_() for t in x)
    y_a = _flat(fused(x_a if len(x_a) > 1 else x_a[0]))
    y_b = _flat(seed_order(x_b if len(x_b) > 1 else x_b[0]))
    for a, b in zip(y_a, y_b):
        assert torch.equal(a, b)
    assert any((t == 0).any() for t in y_a)
    grads = [torch.randn_like(t) for t in y_a]
    torch.autograd.backward(y_a, grads)
    torch.autograd.backward(y_b, grads)
    for a, b in zip(x_a, x_b):
        assert torch.equal(a.grad, b.grad)
    for (name, p), q in zip(fused.named_parameters(), seed_order.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, r), s in zip(fused.named_buffers(), seed_order.buffers()):
        assert torch.equal(r, s), name


def test_octave_alpha_zero_has_vanilla_parameter_shapes():
    vanilla = ClassificationModel("vanilla", 0.0, 2)
    octave = ClassificationModel("octave", 0.0, 2)
    assert [p.shape for p in vanilla.parameters()] == [p.shape for p in octave.parameters()]
    # ... and with the same weights it is the same function.
    with torch.no_grad():
        for p, q in zip(octave.parameters(), vanilla.parameters()):
            p.copy_(q)
    vanilla.eval()
    octave.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(vanilla(x), octave(x), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.125, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("expansion", [1, 2])
def test_multi_octave_equals_octave_with_the_same_weights(alpha, expansion):
    torch.manual_seed(1)
    octave = ClassificationModel("octave", alpha, expansion)
    multi = ClassificationModel("multi-octave", alpha, expansion)
    multi.load_state_dict(octave.state_dict())  # same parameter names: interchangeable
    x = torch.randn(6, 3, 32, 32)
    labels = torch.randint(0, 10, (6,))
    out_o, loss_o = octave(x, labels)
    out_m, loss_m = multi(x, labels)
    assert torch.allclose(out_o, out_m, atol=1e-5)
    loss_o.backward()
    loss_m.backward()
    for (name, p), q in zip(octave.named_parameters(), multi.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def _inputs(channels, alpha_in, size, batch=3):
    if alpha_in == 0:
        return torch.randn(batch, channels, size, size, requires_grad=True)
    high = int((1 - alpha_in) * channels)
    return (torch.randn(batch, high, size, size, requires_grad=True),
            torch.randn(batch, channels - high, size // 2, size // 2, requires_grad=True))


def _flat(x):
    return x if isinstance(x, tuple) else (x,)


ALPHA_PAIRS = [(0.0, 0.25), (0.0, 0.5), (0.25, 0.25), (0.5, 0.5), (0.75, 0.75), (0.5, 0.0),
               (0.25, 0.75), (0.75, 0.0), (0.0, 0.0)]


@pytest.mark.parametrize("alphas, channels, stride, size",
                         [(a, c, s, z) for a, c, s, z in itertools.product(
                             ALPHA_PAIRS, [(8, 16), (16, 16), (32, 12)], [1, 2], [8, 9, 16])])
def test_fused_matches_octconv_forward_and_gradients(alphas, channels, stride, size):
    cin, cout = channels
    torch.manual_seed(hash((alphas, channels, stride, size)) % 1000)
    ref = octconv.OctConv2d(cin, cout, 3, stride=stride, padding=1, alpha=alphas)
    fused = FusedOctConv2d(cin, cout, 3, stride=stride, padding=1, alpha=alphas)
    fused.load_state_dict(ref.state_dict())
    x = _inputs(cin, alphas[0], size)
    x2 = tuple(t.detach().clone().requires_grad_() for t in _flat(x))
    y_ref, y_fused = _flat(ref(x)), _flat(fused(x2 if len(x2) > 1 else x2[0]))
    assert [t.shape for t in y_ref] == [t.shape for t in y_fused]
    for a, b in zip(y_ref, y_fused):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    grads = [torch.randn_like(t) for t in y_ref]
    torch.autograd.backward(y_ref, grads)
    torch.autograd.backward(y_fused, grads)
    for a, b in zip(_flat(x), x2):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name


def test_fused_with_bias_matches_octconv():
    torch.manual_seed(0)
    ref = octconv.OctConv2d(16, 16, 3, padding=1, alpha=0.5, bias=True)
    fused = FusedOctConv2d(16, 16, 3, padding=1, alpha=0.5, bias=True)
    fused.load_state_dict(ref.state_dict())
    x = _inputs(16, 0.5, 8)
    for a, b in zip(ref(x), fused(x)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cin, cout, alpha", [
    (16, 16, 1.0),          # octconv builds no h2h convolution and then fails in forward
    (16, 16, (0.0, 1.0)),
    (16, 16, 0.97),         # int(0.03 * 16) = 0 high-frequency channels
    (4, 16, (0.9, 0.5)),    # 0 high input channels
])
def test_fused_refuses_what_octconv_gets_wrong(cin, cout, alpha):
    with pytest.raises(ValueError, match="alpha"):
        FusedOctConv2d(cin, cout, 3, padding=1, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        OctaveBlock(cin, cout, alpha if isinstance(alpha, tuple) else (alpha, alpha))


def test_parallel_scope_wraps_every_octave_convolution():
    entered = []

    class Scope:
        def __init__(self, conv):
            self.branches = octave_branches(conv)

        def __enter__(self):
            entered.append(self.branches)

        def __exit__(self, *exc):
            return False

    model = ClassificationModel("multi-octave", 0.5, 1, parallel_scope=Scope)
    assert all(type(b.octconv) is octconv.OctConv2d for b in model.convlayers)
    model(torch.randn(2, 3, 32, 32))
    assert entered == [["h2h", "h2l"], ["h2h", "h2l", "l2l", "l2h"], ["h2h", "l2h"]]
    entered.clear()
    ClassificationModel("octave", 0.5, 1, parallel_scope=Scope)(torch.randn(2, 3, 32, 32))
    assert entered == []  # octave mode never groups its convolutions


@pytest.mark.parametrize("mode", ["vanilla", "octave", "multi-octave"])
def test_channels_last_gives_the_same_results(mode):
    torch.manual_seed(0)
    a = ClassificationModel(mode, 0.25, 1)
    b = ClassificationModel(mode, 0.25, 1).to(memory_format=torch.channels_last)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 32, 32)
    labels = torch.randint(0, 10, (4,))
    out_a, loss_a = a(x, labels)
    out_b, loss_b = b(x.contiguous(memory_format=torch.channels_last), labels)
    assert torch.allclose(out_a, out_b, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_flops_counted_and_theoretical():
    from octconv_exp.models.flops import count_flops_per_image, seed_cnn_flops_ratio
    from octconv_exp.models.octave import octave_cost

    vanilla = count_flops_per_image(ClassificationModel("vanilla", 0.5, 1))
    assert vanilla == 2 * (3 * 16 * 9 * 32 * 32 + 16 * 32 * 9 * 16 * 16 + 32 * 16 * 9 * 8 * 8
                           + 16 * 4 * 4 * 10)
    for alpha in (0.25, 0.5, 0.75):
        for mode in ("octave", "multi-octave"):
            counted = count_flops_per_image(ClassificationModel(mode, alpha, 1)) / vanilla
            # alpha*16 and alpha*32 are whole channel counts here, so the split is exact.
            assert counted == pytest.approx(seed_cnn_flops_ratio(mode, alpha, 1), rel=1e-9)
    assert [round(octave_cost(a, a), 2) for a in (0.125, 0.25, 0.5, 0.75)] == [0.82, 0.67, 0.44, 0.30]


def test_flop_counter_needs_only_torch_2_0_and_agrees_with_torchs():
    """FlopCounter (a TorchFunctionMode, torch >= 2.0) counts convolutions called as modules or
    functionally, linear layers and matrix products; where torch has its own counter
    (torch.utils.flop_counter, torch >= 2.1) both give the same numbers."""
    from octconv_exp.models.flops import FlopCounter, count_flops_per_image

    x, w = torch.zeros(2, 3, 8, 8), torch.zeros(4, 3, 3, 3)
    with FlopCounter() as counter:
        torch.nn.functional.conv2d(x, w, padding=1)  # 2 x 4x8x8 outputs, 27 MACs each
        torch.nn.Linear(5, 7)(torch.zeros(3, 5))  # 3x7 outputs, 5 MACs each
        torch.zeros(2, 6) @ torch.zeros(6, 4)
        torch.nn.functional.conv2d(x, torch.zeros(6, 1, 3, 3), groups=3)  # depthwise-like
    assert counter.total == 2 * (2 * 4 * 64 * 27 + 3 * 7 * 5 + 2 * 4 * 6 + 2 * 6 * 6 * 6 * 9)
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no flop_counter to compare with")
    for mode in ("vanilla", "octave", "multi-octave"):
        for alpha in (0.25, 0.5):
            model = ClassificationModel(mode, alpha, 2).eval()
            with FlopCounterMode(display=False) as reference, torch.no_grad():
                model(torch.zeros(1, 3, 32, 32))
            assert count_flops_per_image(model) == reference.get_total_flops()
