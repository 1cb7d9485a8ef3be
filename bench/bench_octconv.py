"""octconv-exp benchmark: octave vs vanilla convolution speed, FLOPs, and framework overhead.

    make bench                      # CPU, writes bench/results/<device>.json
    .venv/bin/python bench/bench_octconv.py --device cuda --out bench/results/cuda.json

Everything is measured in one process with warm-up, configurations interleaved round-robin
over several repeats (so a slow patch of a shared machine hits all of them alike), and the
median kept. It prints ratios, not absolute claims: compare numbers from the same run only.
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import octconv  # noqa: E402
from _shared import interleaved, warm, write_results  # noqa: E402

from octconv_exp.backends.native import use_channels_last  # noqa: E402
from octconv_exp.data.datasets import BatchLoader, make_synthetic  # noqa: E402
from octconv_exp.training.loop import train_epoch  # noqa: E402
from octconv_exp.models.flops import count_flops_per_image, seed_cnn_flops_ratio  # noqa: E402
from octconv_exp.models.octave import ClassificationModel, FusedOctConv2d, octave_cost  # noqa: E402
from octconv_exp.models.resnet import ResNetCifar, ResNetImageNet  # noqa: E402

MODES = ("vanilla", "octave", "multi-octave")
ALPHAS = (0.25, 0.5, 0.75)
SHAPES = ((1, 8), (4, 64))  # (expansion, batch): the seed's defaults, and a wider model


# ------------------------------------------------------------------------------- single layer


def single_layer(device, args):
    c, size, batch, alpha = 128, 32, 32, 0.5
    fmt = args.memory_format
    torch.manual_seed(0)
    vanilla = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(device).to(memory_format=fmt)
    ref = octconv.OctConv2d(c, c, 3, padding=1, alpha=alpha).to(device).to(memory_format=fmt)
    fused = FusedOctConv2d(c, c, 3, padding=1, alpha=alpha).to(device).to(memory_format=fmt)
    fused.load_state_dict(ref.state_dict())
    high = int((1 - alpha) * c)

    def randn(*shape):
        return torch.randn(*shape, device=device).contiguous(memory_format=fmt)

    x = randn(batch, c, size, size)
    xo = (randn(batch, high, size, size), randn(batch, c - high, size // 2, size // 2))
    # Dense output gradients, as a network's backward gives (the expanded gradient of a
    # .sum() would favour a broadcast add, whose backward is then a trivial reduction).
    grads = {id(x): (randn(batch, c, size, size),),
             id(xo): (randn(batch, high, size, size), randn(batch, c - high, size // 2, size // 2))}

    def fwd(m, inp):
        def f():
            with torch.no_grad():
                m(inp)
        return f

    def fwd_bwd(m, inp):
        def f():
            out = m(inp)
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(out, grads[id(inp)])
        return f

    rows = {}
    for kind, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        fns = {"vanilla": make(vanilla, x), "octave": make(ref, xo), "multi-octave": make(fused, xo)}
        warm(fns, 3)
        t = interleaved(fns, args.repeats, args.layer_inner, device)
        rows[kind] = {k: {"ms": v * 1e3, "ratio": v / t["vanilla"]} for k, v in t.items()}
    return {"channels": c, "size": size, "batch": batch, "alpha": alpha,
            "theoretical_ratio": octave_cost(alpha, alpha), "times": rows,
            "memory_format": "channels_last" if fmt == torch.channels_last else "channels_first"}


# ------------------------------------------------------------------------------- whole model


def model_step_fns(mode, alpha, expansion, batch, device, memory_format):
    torch.manual_seed(0)
    model = ClassificationModel(mode, alpha or 0.5, expansion).to(device)
    flops = count_flops_per_image(model)
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xb = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    yb = torch.randint(0, 10, (batch,), device=device)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        _, loss = model(xb, yb)
        loss.backward()
        opt.step()

    def infer_step():
        model.eval()
        with torch.no_grad():
            model(xb)

    return train_step, infer_step, flops


def model_grid(device, args):
    memory_format = args.memory_format
    results = []
    for expansion, batch in SHAPES:
        configs = [("vanilla", None)] + [(m, a) for m in MODES[1:] for a in ALPHAS]
        train_fns, infer_fns, meta = {}, {}, {}
        for mode, alpha in configs:
            name = mode if alpha is None else f"{mode}@{alpha}"
            train_fns[name], infer_fns[name], flops = model_step_fns(mode, alpha, expansion, batch,
                                                                     device, memory_format)
            meta[name] = (mode, alpha, flops)
        inner = args.model_inner if expansion == 1 else max(1, args.model_inner // 20)
        warm(train_fns, 3)
        warm(infer_fns, 3)
        t_train = interleaved(train_fns, args.repeats, inner, device)
        t_infer = interleaved(infer_fns, args.repeats, inner, device)
        vanilla_flops = meta["vanilla"][2]
        for name, (mode, alpha, flops) in meta.items():
            results.append({
                "expansion": expansion, "batch": batch, "conv": mode, "alpha": alpha,
                "train_images_per_second": batch / t_train[name],
                "inference_images_per_second": batch / t_infer[name],
                "train_time_ratio": t_train[name] / t_train["vanilla"],
                "inference_time_ratio": t_infer[name] / t_infer["vanilla"],
                "flops_ratio": flops / vanilla_flops,
                "theoretical_ratio": seed_cnn_flops_ratio(mode, alpha or 0.0, expansion),
            })
    return results


# ------------------------------------------------------------------------------- ResNets

#: (label, builder, input size, batch): ResNet-20 at He et al.'s batch 128, and the
#: Oct-ResNet-50 bottleneck network at a small batch (a full ImageNet-size step).
RESNETS = (("resnet_cifar-20", lambda mode: ResNetCifar(20, conv_mode=mode, alpha=0.5), 32, 128),
           ("resnet_imagenet-50", lambda mode: ResNetImageNet(50, conv_mode=mode, alpha=0.5,
                                                              num_classes=1000), 224, 4))


def resnet_rows(device, args):
    """Training steps (SGD momentum 0.9) of each ResNet in the three conv modes, alpha 0.5,
    in both memory formats, interleaved; times relative to vanilla and to octconv's octave."""
    out = []
    for label, build, size, batch in RESNETS:
        if args.quick and "imagenet" in label:
            batch = 2
        fns, flops = {}, {}
        for fmt_name, fmt in (("channels_first", torch.contiguous_format),
                              ("channels_last", torch.channels_last)):
            for mode in MODES:
                torch.manual_seed(0)
                model = build(mode).to(device)
                if fmt_name == "channels_first":
                    flops[mode] = count_flops_per_image(model, (3, size, size))
                model = model.to(memory_format=fmt)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                xb = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
                yb = torch.randint(0, 10, (batch,), device=device)

                def step(model=model, opt=opt, xb=xb, yb=yb):
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
                    opt.step()

                fns[(fmt_name, mode)] = step
        warm(fns, 1 if "imagenet" in label else 2)
        inner = 1 if "imagenet" in label else 2
        t = interleaved(fns, max(3, args.repeats // 2), inner, device)
        for (fmt_name, mode), seconds in t.items():
            out.append({"model": label, "batch": batch, "size": size, "memory_format": fmt_name,
                        "conv": mode, "alpha": 0.5, "train_images_per_second": batch / seconds,
                        "time_vs_vanilla": seconds / t[(fmt_name, "vanilla")],
                        "time_vs_octave": seconds / t[(fmt_name, "octave")],
                        "flops_ratio": flops[mode] / flops["vanilla"]})
    return out


def _resnet(r, model, fmt, conv):
    return next(m for m in r["resnets"] if m["model"] == model and m["memory_format"] == fmt
                and m["conv"] == conv)


def speed_settings(device, args):
    """channels_last off and on, for vanilla and multi-octave at alpha 0.5."""
    out = []
    for expansion, batch in SHAPES:
        fns = {}
        for mode in ("vanilla", "multi-octave"):
            for fmt_name, fmt in (("channels_first", torch.contiguous_format),
                                  ("channels_last", torch.channels_last)):
                fns[(mode, fmt_name)] = model_step_fns(mode, 0.5, expansion, batch, device, fmt)[0]
        inner = args.model_inner if expansion == 1 else max(1, args.model_inner // 20)
        warm(fns, 3)
        t = interleaved(fns, args.repeats, inner, device)
        for (mode, fmt_name), sec in t.items():
            out.append({"expansion": expansion, "batch": batch, "conv": mode, "alpha": 0.5,
                        "memory_format": fmt_name, "train_images_per_second": batch / sec,
                        "vs_vanilla_channels_first": sec / t[("vanilla", "channels_first")]})
    return out


# ------------------------------------------------------------------------------- framework


def framework_overhead(device, args):
    """run.py's loop (BatchLoader + train_epoch) against a bare loop over the same batches,
    at the seed's defaults (vanilla, expansion 1, batch 8), where overhead shows most."""
    n, batch = args.overhead_images, 8
    data = make_synthetic(n, seed=0)
    mean, std = data.channel_stats()
    fmt = args.memory_format
    loader = BatchLoader(data, batch, mean, std, shuffle=True, drop_last=True, device=device, seed=0,
                         memory_format=fmt)
    normalised = loader.normalise(data.images.to(device)).contiguous(memory_format=fmt)
    labels = data.labels.to(device)
    bare_batches = [(normalised[i:i + batch], labels[i:i + batch]) for i in range(0, n - batch + 1, batch)]

    def make():
        torch.manual_seed(0)
        model = ClassificationModel("vanilla", 0.5, 1).to(device).to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            out, loss = model(x, y)
            loss.backward()
            opt.step()
            return out.detach(), loss.detach()
        return step

    run_step, bare_step = make(), make()

    def framework():
        train_epoch(run_step, loader, 1, 1, progress_bar=True)

    def bare():
        for x, y in bare_batches:
            bare_step(x, y)

    def loader_only():
        for _ in loader:
            pass

    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # the tqdm bar is part of the cost, not of the output
        fns = {"framework": framework, "bare": bare, "loader": loader_only}
        warm(fns, 1)
        t = interleaved(fns, args.repeats, 1, device)
    images = len(bare_batches) * batch
    return {"images": images, "batch": batch,
            "framework_images_per_second": images / t["framework"],
            "bare_images_per_second": images / t["bare"],
            "framework_vs_bare": t["bare"] / t["framework"],
            "loader_images_per_second": images / t["loader"],
            "loader_vs_model": t["bare"] / t["loader"]}


# ------------------------------------------------------------------------------- report


TARGETS = [
    ("single layer a=0.5 forward+backward, multi-octave / vanilla <= 0.47",
     lambda r: r["single_layer"]["times"]["forward+backward"]["multi-octave"]["ratio"], "<=", 0.47),
    ("model exp 4 batch 64 a=0.5, multi-octave train time / vanilla <= 0.45",
     lambda r: _model(r, 4, "multi-octave", 0.5)["train_time_ratio"], "<=", 0.45),
    ("model exp 1 batch 8 a=0.5, multi-octave train time / vanilla <= 1.0",
     lambda r: _model(r, 1, "multi-octave", 0.5)["train_time_ratio"], "<=", 1.0),
    ("framework loop / bare loop throughput >= 0.90",
     lambda r: r["framework"]["framework_vs_bare"], ">=", 0.90),
    ("loader alone / model consumption >= 10",
     lambda r: r["framework"]["loader_vs_model"], ">=", 10.0),
    ("ResNet-20 batch 128 a=0.5 (channels_last), multi-octave / octave train time <= 0.80",
     lambda r: _resnet(r, "resnet_cifar-20", "channels_last", "multi-octave")["time_vs_octave"],
     "<=", 0.80),
    ("ResNet-20 batch 128 a=0.5 (channels_first), multi-octave / octave train time <= 0.80",
     lambda r: _resnet(r, "resnet_cifar-20", "channels_first", "multi-octave")["time_vs_octave"],
     "<=", 0.80),
]


def _model(r, expansion, conv, alpha):
    return next(m for m in r["model"] if m["expansion"] == expansion and m["conv"] == conv
                and m["alpha"] == alpha)


def table(r):
    lines = [f"octconv-exp benchmark — {r['device']} — torch {r['torch']} — {r['threads']} threads "
             f"— model grid and framework in {r['memory_format']}", ""]
    if "single_layer" in r:
        lines += _main_tables(r)
    lines += ["", "ResNets: training step (SGD momentum 0.9), alpha 0.5",
              "| model | batch | memory format | conv | train img/s | time / vanilla | "
              "time / octave (octconv) | counted FLOPs / vanilla |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in r["resnets"]:
        lines.append(f"| {m['model']} | {m['batch']} | {m['memory_format']} | {m['conv']} | "
                     f"{m['train_images_per_second']:.1f} | {m['time_vs_vanilla']:.3f} | "
                     f"{m['time_vs_octave']:.3f} | {m['flops_ratio']:.3f} |")
    lines += ["", "Targets:"]
    for name, value, op, bound in r["targets"]:
        ok = value <= bound if op == "<=" else value >= bound
        lines.append(f"  [{'met' if ok else 'MISSED'}] {name}: {value:.3f}")
    return "\n".join(lines)


def _main_tables(r):
    lines = []
    s = r["single_layer"]
    lines.append(f"Single layer: {s['channels']} channels, {s['size']}x{s['size']}, batch {s['batch']}, "
                 f"alpha {s['alpha']}, {s.get('memory_format', 'channels_first')} "
                 f"(theory {s['theoretical_ratio']:.3f}x vanilla)")
    lines.append("| pass | vanilla ms | octave (octconv) | multi-octave (fused) |")
    lines.append("| --- | --- | --- | --- |")
    for kind, t in s["times"].items():
        lines.append(f"| {kind} | {t['vanilla']['ms']:.2f} | {t['octave']['ratio']:.3f}x | "
                     f"{t['multi-octave']['ratio']:.3f}x |")
    lines += ["", "Whole model (training step with SGD; inference in eval mode)",
              "| expansion | batch | conv | alpha | train img/s | infer img/s | train time / vanilla "
              "| infer time / vanilla | counted FLOPs / vanilla | theoretical |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in r["model"]:
        lines.append(f"| {m['expansion']} | {m['batch']} | {m['conv']} | "
                     f"{'—' if m['alpha'] is None else m['alpha']} | {m['train_images_per_second']:.0f} | "
                     f"{m['inference_images_per_second']:.0f} | {m['train_time_ratio']:.3f} | "
                     f"{m['inference_time_ratio']:.3f} | {m['flops_ratio']:.3f} | {m['theoretical_ratio']:.3f} |")
    lines += ["", "Speed setting: memory format (alpha 0.5; time relative to vanilla channels_first)",
              "| expansion | batch | conv | memory format | train img/s | time / vanilla channels_first |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m in r["speed_settings"]:
        lines.append(f"| {m['expansion']} | {m['batch']} | {m['conv']} | {m['memory_format']} | "
                     f"{m['train_images_per_second']:.0f} | {m['vs_vanilla_channels_first']:.3f} |")
    f = r["framework"]
    lines += ["", f"Framework ({f['images']} images, vanilla, batch {f['batch']}): run loop "
              f"{f['framework_images_per_second']:.0f} img/s vs bare loop {f['bare_images_per_second']:.0f} "
              f"img/s = {f['framework_vs_bare']:.3f}x; loader alone {f['loader_images_per_second']:.0f} "
              f"img/s = {f['loader_vs_model']:.1f}x the model's consumption"]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/<device>.json)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layer-inner", type=int, default=3)
    parser.add_argument("--model-inner", type=int, default=40)
    parser.add_argument("--overhead-images", type=int, default=4000)
    parser.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                        help="memory format of the model grid and framework runs (as speed.channels_last)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--only", choices=["resnets"], default=None,
                        help="run one section only (its table and targets)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.layer_inner, args.model_inner, args.overhead_images = 2, 1, 4, 400
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("error: --device cuda: no CUDA device is available here\n")
        return 2
    device = torch.device(args.device)
    args.memory_format = (torch.channels_last if use_channels_last(args.channels_last, device.type)
                          else torch.contiguous_format)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine())
    r = {"device": f"{device.type} ({name})", "torch": torch.__version__,
         "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
         "memory_format": "channels_last" if args.memory_format == torch.channels_last else "channels_first"}
    if args.only is None:
        r.update(single_layer=single_layer(device, args), model=model_grid(device, args),
                 speed_settings=speed_settings(device, args),
                 framework=framework_overhead(device, args))
    r["resnets"] = resnet_rows(device, args)
    r["targets"] = []
    for label, get, op, bound in TARGETS:
        try:
            r["targets"].append((label, get(r), op, bound))
        except KeyError:  # a section --only left out
            pass
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{device.type}.json")
    print(table(r) + "\n")
    write_results(out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
