"""CIFAR and ImageNet ResNets in vanilla, octave and multi-octave form (octconv_exp.models.resnet)."""
import octconv
import pytest
import torch
import torch.nn as nn

from octconv_exp.models.flops import count_flops_per_image
from octconv_exp.models.octave import FusedOctConv2d, count_parameters, octave_branches, octave_cost
from octconv_exp.models.resnet import (ConvBN, ConvSpec, FreqApply, FreqGlobalAvgPool, FreqReLU,
                                OctBatchNorm2d, PooledConv2d, ResNetCifar, ResNetImageNet,
                                freq_add, make_conv, octave_cost_strided, spec_flops,
                                theoretical_flops_ratio)

MODES = ("vanilla", "octave", "multi-octave")
META = torch.device("meta")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These inputs are tiny: one thread is faster than two, and does not crawl (seconds for a
    millisecond forward) when another process keeps the second core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meta(cls, **kwargs):
    with META:
        return cls(**kwargs)


def _octave_convs(model):
    return [m for m in model.modules() if isinstance(m, octconv.OctConv2d)]


def _alphas(unit):
    conv = unit.conv
    if isinstance(conv, octconv.OctConv2d):
        return conv.alpha_in, conv.alpha_out
    return 0.0, 0.0


# --------------------------------------------------------------------------- counts

# ResNet-20 with option-B (1x1 projection) shortcuts, 10 classes:
#   3x3 convs  stem 3*16*9 = 432; stage 1: 6 x 16*16*9 = 13,824;
#              stage 2: 16*32*9 + 5 x 32*32*9 = 50,688; stage 3: 32*64*9 + 5 x 64*64*9 = 202,752
#   BatchNorm  2 x (16 + 6*16 + 6*32 + 6*64) = 1,376;  Linear 64*10 + 10 = 650
#   = 269,722, the paper's "0.27M" (option A, parameter-free shortcuts), plus the two
#   projections 16*32 + 2*32 = 576 and 32*64 + 2*64 = 2,176 -> 272,474.
# The octave version adds the last block's projection 64*64 + 2*64 = 4,224 -> 276,698.
RESNET20_B = 269_722 + 576 + 2_176
LAST_PROJECTION = 64 * 64 + 2 * 64


@pytest.mark.parametrize("depth, vanilla", [(20, RESNET20_B), (32, 466_906), (56, 855_770)])
def test_cifar_parameter_counts(depth, vanilla):
    # each further block per stage (n = (depth - 2) / 6 over ResNet-20's 3): two 3x3 convs and
    # two BatchNorms in each of the three stages
    per_block = 2 * 9 * (16 * 16 + 32 * 32 + 64 * 64) + 2 * 2 * (16 + 32 + 64)
    assert vanilla == RESNET20_B + ((depth - 2) // 6 - 3) * per_block
    assert count_parameters(_meta(ResNetCifar, depth=depth)) == vanilla
    for mode in ("octave", "multi-octave"):
        for alpha in (0.25, 0.5):
            model = _meta(ResNetCifar, depth=depth, conv_mode=mode, alpha=alpha)
            assert count_parameters(model) == vanilla + LAST_PROJECTION, (mode, alpha)


def test_cifar_width_scales_channels():
    model = _meta(ResNetCifar, depth=20, width=2, num_classes=100, in_channels=1)
    assert model.stem.conv.weight.shape == (32, 1, 3, 3)
    assert model.layer3[-1].conv2.conv.weight.shape == (128, 128, 3, 3)
    assert model.fc.weight.shape == (100, 128)


IMAGENET_LAYERS = {26: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def _torchvision_layers(depth):
    """torchvision's ResNet of this depth (on meta) and, in registration order, each of its
    convolutions and its linear layer with the output shape it gives a 224x224 image."""
    from torchvision.models.resnet import Bottleneck, ResNet

    ref = _meta(ResNet, block=Bottleneck, layers=IMAGENET_LAYERS[depth])
    shapes = {}
    for name, m in ref.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, i, out, name=name: shapes.__setitem__(
                name, tuple(out.shape)))
    with torch.no_grad():
        ref(torch.empty(1, 3, 224, 224, device=META))
    return ref, [(m, shapes[n]) for n, m in ref.named_modules() if n in shapes]


def _multiply_adds(layer, out_shape):
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    kh, kw = layer.kernel_size
    return kh * kw * layer.in_channels // layer.groups * layer.out_channels * out_shape[2] * out_shape[3]


def _octave_share(alpha_in, alpha_out, stride):
    """An octave convolution's multiply-adds over the plain one's: the high-to-high branch at
    the full output resolution, the three touching the low frequencies at half of it (a
    quarter of the pixels); at stride 2 octconv convolves the low input, which already has the
    output's resolution, at all of the output's pixels for the low-to-high branch."""
    high = (1 - alpha_in) * (1 - alpha_out)
    share = high + (1 - high) / 4
    if stride == 2:
        share += alpha_in * (1 - alpha_out) * 3 / 4
    return share


@pytest.mark.parametrize("depth", [26, 50, 101])
def test_imagenet_parameters_and_multiply_adds(depth):
    """Parameters as torchvision's ResNet of the same depth; multiply-adds from its layers'
    shapes, each convolution's scaled by the octave share of the alphas our octave model gives
    it."""
    ref, layers = _torchvision_layers(depth)
    params = count_parameters(ref)
    macs = sum(_multiply_adds(layer, shape) for layer, shape in layers)
    vanilla = _meta(ResNetImageNet, depth=depth)
    assert count_parameters(vanilla) == params
    assert count_flops_per_image(vanilla, (3, 224, 224)) == 2 * macs
    convs = [(layer, shape) for layer, shape in layers if isinstance(layer, nn.Conv2d)]
    head = macs - sum(_multiply_adds(layer, shape) for layer, shape in convs)
    oct_macs = {}
    for alpha in (0.5, 0.25):
        octave = _meta(ResNetImageNet, depth=depth, conv_mode="octave", alpha=alpha)
        units = [m for m in octave.modules() if isinstance(m, ConvBN)]
        assert [u.spec[:4] for u in units] == [
            (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c, _ in convs]
        expected = head + sum(_multiply_adds(c, shape) * _octave_share(*_alphas(u), c.stride[0])
                              for u, (c, shape) in zip(units, convs))
        assert expected == int(expected)  # the channels split exactly at these alphas
        oct_macs[alpha] = int(expected)
        for mode in ("octave", "multi-octave"):
            model = octave if mode == "octave" else _meta(ResNetImageNet, depth=depth,
                                                          conv_mode=mode, alpha=alpha)
            # the four branches partition each weight: the same count, exactly
            assert count_parameters(model) == params
            assert count_flops_per_image(model, (3, 224, 224)) == 2 * oct_macs[alpha], (mode, alpha)
    if depth == 50:
        # torchvision's resnet50: 25,557,032 parameters, 4.09 G multiply-adds; Oct-ResNet-50
        # (alpha 0.5): 2.4 GFLOPs (multiply-adds) in Chen et al. 2019, Table 2.
        assert params == 25_557_032 and round(macs / 1e9, 2) == 4.09
        assert round(oct_macs[0.5] / 1e9, 1) == 2.4


def test_vanilla_imagenet_is_torchvisions_resnet():
    import torchvision as tv
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    ref = ResNet(Bottleneck, [2, 2, 2, 2], num_classes=7).eval()
    ours = ResNetImageNet(26, num_classes=7).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert [v.shape for v in ref_sd.values()] == [v.shape for v in our_sd.values()]
    ours.load_state_dict(dict(zip(our_sd, ref_sd.values())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5, rtol=1e-4)
    assert count_parameters(_meta(ResNetImageNet, depth=50)) == count_parameters(
        tv.models.resnet50())


# --------------------------------------------------------------------------- structure

def test_cifar_octave_layout():
    model = ResNetCifar(20, conv_mode="octave", alpha=0.5)
    assert _alphas(model.stem) == (0.0, 0.5)
    units = [u for u in model.modules() if isinstance(u, ConvBN)]
    assert len(units) == 1 + 18 + 3  # stem, 9 blocks x 2, projections of stages 2, 3 and the last
    last = model.layer3[-1]
    assert _alphas(last.conv1) == (0.5, 0.5) and _alphas(last.conv2) == (0.5, 0.0)
    assert _alphas(last.shortcut) == (0.5, 0.0) and last.shortcut.conv.kernel_size == 1
    others = [u for u in units if u not in (model.stem, last.conv2, last.shortcut)]
    assert all(_alphas(u) == (0.5, 0.5) for u in others)
    assert [b.shortcut is not None for b in model.modules() if hasattr(b, "shortcut")] == \
        [False] * 3 + [True, False, False] + [True, False, True]
    assert isinstance(model.layer1[0].conv1.bn, OctBatchNorm2d)
    assert isinstance(last.conv2.bn, nn.BatchNorm2d)
    assert all(type(c) is octconv.OctConv2d for c in _octave_convs(model))
    vanilla = ResNetCifar(20)
    assert not _octave_convs(vanilla)
    assert [b.shortcut is not None for b in vanilla.modules() if hasattr(b, "shortcut")] == \
        [False] * 3 + [True, False, False] + [True, False, False]


def test_imagenet_octave_layout():
    model = _meta(ResNetImageNet, depth=50, conv_mode="octave", alpha=0.25)
    assert type(model.stem.conv) is nn.Conv2d and model.stem.conv.stride == (2, 2)
    first = model.layer1[0]
    assert [_alphas(u) for u in (first.conv1, first.conv2, first.conv3, first.shortcut)] == \
        [(0.0, 0.25), (0.25, 0.25), (0.25, 0.25), (0.0, 0.25)]
    t = model.layer4[0]
    assert [_alphas(u) for u in (t.conv1, t.conv2, t.conv3, t.shortcut)] == \
        [(0.25, 0.0), (0.0, 0.0), (0.0, 0.0), (0.25, 0.0)]
    assert type(t.conv2.conv) is PooledConv2d and t.shortcut.conv.stride == 2
    for block in list(model.layer2) + list(model.layer3):
        assert all(_alphas(getattr(block, n)) == (0.25, 0.25) for n in ("conv1", "conv2", "conv3"))
    assert all(type(u.conv) is nn.Conv2d for b in model.layer4[1:] for u in b.modules()
               if isinstance(u, ConvBN))
    # 16 blocks of 3 convolutions + 4 projections (the stem is not counted), less layer4's two
    # vanilla blocks and the transition block's vanilla 3x3 and 1x1 expansion
    assert len(_octave_convs(model)) == 16 * 3 + 4 - 2 * 3 - 2
    multi = _meta(ResNetImageNet, depth=50, conv_mode="multi-octave", alpha=0.25)
    assert all(type(c) is FusedOctConv2d for c in _octave_convs(multi))
    assert list(multi.state_dict()) == list(model.state_dict())


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("mode", MODES)
def test_cifar_any_input_size_from_8(mode):
    torch.manual_seed(0)
    model = ResNetCifar(8, conv_mode=mode, alpha=0.5, num_classes=5).eval()
    with torch.no_grad():
        for h, w in [(32, 32), (64, 64), (40, 40), (8, 8), (33, 37), (9, 15)]:
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 5) and torch.isfinite(out).all(), (h, w)
        if mode == "vanilla":
            assert model(torch.randn(1, 3, 3, 3)).shape == (1, 5)
        else:
            with pytest.raises(ValueError, match=">= 8"):
                model(torch.randn(1, 3, 7, 32))


@pytest.mark.parametrize("mode", MODES)
def test_imagenet_any_input_size(mode):
    torch.manual_seed(0)
    model = ResNetImageNet(26, conv_mode=mode, alpha=0.5, num_classes=7).eval()
    with torch.no_grad():
        for h, w in [(64, 64), (30, 30), (81, 77), (97, 64)]:  # 77..92 need the pooled strides
            out = model(torch.randn(1, 3, h, w))
            assert out.shape == (1, 7) and torch.isfinite(out).all(), (h, w)
        if mode == "vanilla":
            assert model(torch.randn(1, 3, 5, 5)).shape == (1, 7)
        else:
            with pytest.raises(ValueError, match=">= 30"):
                model(torch.randn(1, 3, 29, 64))


def test_forward_returns_logits():
    torch.manual_seed(0)
    model = ResNetCifar(8, conv_mode="octave", alpha=0.25).eval()
    out = model(torch.randn(4, 3, 16, 16))
    assert out.shape == (4, 10)
    assert not torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-2)  # not probabilities
    assert not torch.allclose(out.sum(1), torch.zeros(4), atol=1e-3)


# --------------------------------------------------------------------------- multi-octave

def _same_forward_and_gradients(cls, kwargs, alpha, size):
    """In float64, so that rounding (which training-mode BatchNorm over few values amplifies to
    ~1e-3 relative in float32 gradients) cannot hide or fake a difference."""
    torch.manual_seed(3)
    octave = cls(conv_mode="octave", alpha=alpha, **kwargs).double()
    multi = cls(conv_mode="multi-octave", alpha=alpha, **kwargs).double()
    multi.load_state_dict(octave.state_dict())
    assert all(type(c) is FusedOctConv2d for c in _octave_convs(multi))
    assert any(c.stride == 2 and c.kernel_size == 3 for c in _octave_convs(multi))
    assert any(c.stride == 2 and c.kernel_size == 1 for c in _octave_convs(multi))
    names = [n for n, _ in octave.named_parameters()]
    assert names == [n for n, _ in multi.named_parameters()]
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    for train in (True, False):
        octave.train(train)
        multi.train(train)
        octave.zero_grad()
        multi.zero_grad()
        out_o, out_m = octave(x), multi(x)
        assert out_o.shape == out_m.shape == (2, kwargs["num_classes"])
        assert torch.allclose(out_o, out_m, atol=1e-10, rtol=1e-10), train
        g = torch.randn_like(out_o)
        out_o.backward(g)
        out_m.backward(g)
        for (name, p), q in zip(octave.named_parameters(), multi.parameters()):
            assert p.grad is not None and q.grad is not None, name
            assert p.grad.abs().max() > 0, name
            assert torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-9), (train, name)
        if train:  # the BatchNorm statistics moved alike
            for (name, a), b in zip(octave.named_buffers(), multi.buffers()):
                assert torch.allclose(a.double(), b.double(), atol=1e-12), name


@pytest.mark.parametrize("alpha", [0.25, 0.5])
def test_multi_octave_equals_octave_cifar(alpha):
    _same_forward_and_gradients(ResNetCifar, dict(depth=20, num_classes=10), alpha, 32)


def test_multi_octave_equals_octave_imagenet():
    _same_forward_and_gradients(ResNetImageNet, dict(depth=26, num_classes=10), 0.5, 64)


class CountingScope:
    """A stand-in for poptorch.MultiConv: records the branches of each conv it is entered for."""
    entered = []

    def __init__(self, conv):
        assert isinstance(conv, octconv.OctConv2d)
        self.branches = octave_branches(conv)

    def __enter__(self):
        CountingScope.entered.append(self.branches)

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("cls, kwargs, size", [
    (ResNetCifar, dict(depth=8), 16), (ResNetImageNet, dict(depth=26), 32)])
def test_parallel_scope_entered_once_per_octave_convolution(cls, kwargs, size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    scoped = cls(conv_mode="multi-octave", alpha=0.5, parallel_scope=CountingScope,
                 **kwargs).eval()
    convs = _octave_convs(scoped)
    assert convs and all(type(c) is octconv.OctConv2d for c in convs)
    CountingScope.entered = []
    scoped(x)
    assert len(CountingScope.entered) == len(convs)
    assert CountingScope.entered[0] == ["h2h", "h2l"]  # the first octave conv: alpha_in = 0
    assert ["h2h", "l2h"] in CountingScope.entered  # the one that merges into high frequency
    CountingScope.entered = []
    scoped(x)
    assert len(CountingScope.entered) == len(convs)  # again on every forward
    # same function as the fused model with the same weights
    fused = cls(conv_mode="multi-octave", alpha=0.5, **kwargs).eval()
    fused.load_state_dict(scoped.state_dict())
    assert torch.allclose(fused(x), scoped(x), atol=1e-5, rtol=1e-4)
    for mode in ("octave", "vanilla"):
        CountingScope.entered = []
        cls(conv_mode=mode, alpha=0.5, parallel_scope=CountingScope, **kwargs).eval()(x)
        assert CountingScope.entered == [], mode


# --------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("cls, depth, size, rel", [
    (ResNetCifar, 20, 32, 0.02), (ResNetCifar, 56, 40, 0.02), (ResNetImageNet, 50, 224, 1e-9)])
def test_theoretical_flops_ratio_matches_counted(cls, depth, size, rel):
    vanilla = _meta(cls, depth=depth)
    specs = vanilla.conv_specs(size)
    assert all(isinstance(s, ConvSpec) and len(s) == 7 for s in specs)
    assert specs[-1][:6] == (vanilla.fc.in_features, vanilla.fc.out_features, 1, 1, 0.0, 0.0)
    counted_vanilla = count_flops_per_image(vanilla, (3, size, size))
    assert sum(spec_flops(s) for s in specs) == counted_vanilla  # the specs are the network
    assert len(specs) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in vanilla.modules())
    assert theoretical_flops_ratio(specs) == 1.0
    for alpha in (0.25, 0.5):
        octave = _meta(cls, depth=depth, conv_mode="octave", alpha=alpha)
        o_specs = octave.conv_specs(size)
        counted = count_flops_per_image(octave, (3, size, size))
        ratio = theoretical_flops_ratio(o_specs)
        assert ratio == pytest.approx(counted / counted_vanilla, rel=rel)
        # the textbook formula (every layer at octave_cost) misses octconv's strided low-to-high
        assert theoretical_flops_ratio(o_specs, strided=False) < ratio
        if size % 32 == 0:  # every split and every halving exact: the count is the theory
            total = sum(spec_flops(s) for s in o_specs)
            assert counted == pytest.approx(ratio * total, rel=1e-9)


def test_octave_cost_strided():
    assert octave_cost_strided(0.5, 0.5, 1) == octave_cost(0.5, 0.5) == 0.4375
    assert octave_cost_strided(0.5, 0.5, 2) == pytest.approx(0.4375 + 0.1875)
    assert octave_cost_strided(0.5, 0.0, 2) == 1.0  # h2h and l2h both at the output's pixels
    assert octave_cost_strided(0.0, 0.5, 2) == octave_cost(0.0, 0.5)


def test_imagenet_conv_specs_224():
    specs = _meta(ResNetImageNet, depth=50, conv_mode="octave", alpha=0.5).conv_specs(224)
    assert specs[0] == ConvSpec(3, 64, 7, 112 * 112, 0.0, 0.0, 2)
    assert specs[1] == ConvSpec(64, 64, 1, 56 * 56, 0.0, 0.5, 1)
    assert ConvSpec(1024, 2048, 1, 7 * 7, 0.5, 0.0, 2) in specs  # layer4's projection
    assert len(specs) == 16 * 3 + 4 + 2


# --------------------------------------------------------------------------- pieces

def test_frequency_pieces():
    torch.manual_seed(0)
    h, l = torch.randn(2, 6, 8, 8), torch.randn(2, 2, 4, 4)
    bn = OctBatchNorm2d(6, 2)
    y_h, y_l = bn((h, l))
    assert y_h.shape == h.shape and y_l.shape == l.shape
    assert torch.allclose(y_l.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    r_h, r_l = FreqReLU()((h - 10, l + 10))
    assert r_h.abs().sum() == 0 and torch.equal(r_l, l + 10)
    p_h, p_l = FreqApply(nn.MaxPool2d(2))((h, l))
    assert p_h.shape == (2, 6, 4, 4) and p_l.shape == (2, 2, 2, 2)
    s_h, s_l = freq_add((h, l), (h, l))
    assert torch.equal(s_h, 2 * h) and torch.equal(s_l, 2 * l)
    a_h, a_l = h.clone(), l.clone()
    i_h, i_l = freq_add((a_h, a_l), (h, l), inplace=True)
    assert i_h is a_h and i_l is a_l and torch.equal(a_h, 2 * h) and torch.equal(a_l, 2 * l)
    with pytest.raises(ValueError, match="shortcut"):
        freq_add((h, l), h)
    pooled = FreqGlobalAvgPool()((h, l))
    assert pooled.shape == (2, 8)
    assert torch.allclose(pooled[:, 6:], l.mean(dim=(2, 3)))
    assert FreqGlobalAvgPool()(h).shape == (2, 6)


def test_make_conv_picks_the_implementation():
    assert type(make_conv(8, 8, 3, 1, 0.5, 0.5, "vanilla")) is nn.Conv2d
    assert type(make_conv(8, 8, 3, 1, 0.5, 0.5, "octave")) is octconv.OctConv2d
    assert type(make_conv(8, 8, 3, 1, 0.5, 0.5, "multi-octave")) is FusedOctConv2d
    assert type(make_conv(8, 8, 3, 1, 0.5, 0.5, "multi-octave", CountingScope)) is \
        octconv.OctConv2d
    assert type(make_conv(8, 8, 3, 1, 0.0, 0.0, "octave")) is nn.Conv2d
    pooled = make_conv(8, 4, 3, 2, 0.0, 0.0, "multi-octave")
    assert type(pooled) is PooledConv2d and pooled.stride == (1, 1)
    x = torch.randn(1, 8, 9, 9)
    assert pooled(x).shape == (1, 4, 4, 4)  # floor, as octconv's strides
    conv = make_conv(8, 6, 1, 2, 0.5, 0.5, "octave")
    assert conv.padding == 0 and conv.stride == 2 and conv.kernel_size == 1


def test_octave_alpha_zero_is_vanilla_with_pooled_strides():
    vanilla = ResNetCifar(8)
    octave = ResNetCifar(8, conv_mode="octave", alpha=0.0)
    assert not _octave_convs(octave)
    assert [(n, p.shape) for n, p in vanilla.named_parameters()] == \
        [(n, p.shape) for n, p in octave.named_parameters()]
    assert sum(type(m) is PooledConv2d for m in octave.modules()) == 4  # 2 strided 3x3 + 2 1x1


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("cls, kwargs, match", [
    (ResNetCifar, dict(depth=21), "6n\\+2 .*20, 32, 44, 56, 110"),
    (ResNetCifar, dict(depth=2), "6n\\+2"),
    (ResNetCifar, dict(depth=24), "6n\\+2"),
    (ResNetCifar, dict(depth=True), "6n\\+2"),
    (ResNetImageNet, dict(depth=34), "26, 50, 101, 152"),
    (ResNetImageNet, dict(depth=20), "26, 50, 101, 152"),
    (ResNetCifar, dict(conv_mode="oct"), "conv_mode must be vanilla, octave or multi-octave"),
    (ResNetImageNet, dict(conv_mode="Octave"), "conv_mode"),
    (ResNetCifar, dict(width=0), "width must be a positive integer"),
    (ResNetImageNet, dict(width=1.5), "width"),
    (ResNetCifar, dict(num_classes=0), "num_classes"),
    (ResNetCifar, dict(conv_mode="octave", alpha=1.0), "alpha must be a number in \\[0, 1\\)"),
    (ResNetImageNet, dict(conv_mode="multi-octave", alpha=-0.1), "alpha"),
    (ResNetCifar, dict(conv_mode="octave", alpha="0.5"), "alpha"),
    # int(0.03 * 16) = 0 high-frequency channels in the stem's output
    (ResNetCifar, dict(conv_mode="octave", alpha=0.97), "alpha=0.97 splits 16 channels"),
    (ResNetCifar, dict(conv_mode="multi-octave", alpha=0.97, width=2), "splits 32 channels"),
])
def test_invalid_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _meta(cls, **kwargs)
    assert "\n" not in str(info.value)


def test_vanilla_ignores_alpha():
    assert count_parameters(_meta(ResNetCifar, alpha=0.97)) == RESNET20_B
