"""octconv-exp inference benchmark: latency of vanilla / octave / multi-octave networks, eager
torch and the exported model under ONNX Runtime, beside their FLOPs (issue 29.5: OctConv's
claim is cheaper inference).

    .venv/bin/python bench/bench_inference.py                   # the whole grid, CPU
    .venv/bin/python bench/bench_inference.py --networks resnet50 --batches 1
    .venv/bin/python bench/bench_inference.py --quick           # a check of the script

Networks: Oct-ResNet-50 at 224x224 (``ResNetImageNet(50)``, 1000 classes), ResNet-20 and the
seed CNN at 32x32; every alpha for octave and multi-octave, vanilla once. Runtimes: eager torch
(eval mode, channels_last, ``torch.inference_mode``) and ONNX Runtime running the model
exported in this process by torch's TorchScript-based ONNX exporter, once per batch size with
fixed shapes (``--onnx-batch dynamic``: once, any batch), its logits checked against eager
torch's first (skipped, with the reason printed, where onnxruntime is not installed). ``--runtimes torchscript`` adds
``torch.jit.freeze`` + ``optimize_for_inference`` of the traced model.

Per network and batch size every (model, runtime) cell is timed round-robin, the order rotating
each round, so a slow patch of a shared machine hits all of them alike; a cell's sample is the
mean over enough calls to last ``--sample-s``; the median of ``--rounds`` samples is kept, with
the quartiles and min/max as its spread. Ratios to vanilla are ratios of medians, each runtime
against vanilla in the same runtime.
"""
import argparse
import io
import os
import platform
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from _shared import rotating_rounds, sync, write_results  # noqa: E402
from octconv_exp.models.flops import count_flops_per_image  # noqa: E402
from octconv_exp.models.flops import seed_cnn_flops_ratio as seed_theoretical_ratio  # noqa: E402
from octconv_exp.models.octave import ClassificationModel  # noqa: E402
from octconv_exp.models.resnet import ResNetCifar, ResNetImageNet, theoretical_flops_ratio  # noqa: E402

OCTAVE_MODES = ("octave", "multi-octave")
ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75)
BATCHES = (1, 32)
#: key -> (label, builder(mode, alpha), input size)
NETWORKS = {
    "resnet50": ("Oct-ResNet-50",
                 lambda mode, a: ResNetImageNet(50, conv_mode=mode, alpha=a, num_classes=1000), 224),
    "resnet20": ("ResNet-20", lambda mode, a: ResNetCifar(20, conv_mode=mode, alpha=a), 32),
    "seed": ("seed CNN", lambda mode, a: ClassificationModel(mode, a, 1), 32),
}
RUNTIMES = ("eager", "onnxruntime", "torchscript")
#: issue 29.5: Oct-ResNet-50 alpha 0.5 at batch 1 within 1.15x of its FLOPs ratio
TARGET = {"network": "resnet50", "alpha": 0.5, "batch": 1, "slack": 1.15}
#: how far ONNX Runtime's logits may be from eager torch's, relative to the logits' largest magnitude
MATCH_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------- runtimes


def onnxruntime_or_reason(device):
    """(the onnxruntime module, its execution providers) or (None, why the column is skipped)."""
    try:
        import onnxruntime
    except ImportError as e:
        return None, f"onnxruntime is not installed ({e}); pip install 'onnxruntime>=1.15'"
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return None, ("this onnxruntime has no CUDAExecutionProvider "
                          f"({', '.join(onnxruntime.get_available_providers())}); "
                          "pip install onnxruntime-gpu")
        return onnxruntime, ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return onnxruntime, ["CPUExecutionProvider"]


def export_onnx(model, example, dynamic=False):
    """The model as ONNX bytes for inputs of ``example``'s shape (``dynamic``: any batch size),
    through the TorchScript-based exporter (the dynamo one needs onnxscript and is not what
    torch 2.0.1 has)."""
    import inspect

    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # tracing warns about the Python-side input-size checks, which hold for these shapes
        warnings.simplefilter("ignore")
        # ONNX Runtime folds constants itself when it loads the model; the exporter's folding
        # took 3-5x as long as the rest of the export of ResNet-50 here.
        if dynamic:
            kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(model, (example,), buffer, opset_version=17, input_names=["images"],
                          output_names=["logits"], do_constant_folding=False, **kwargs)
    return buffer.getvalue()


def ort_session(ort, providers, onnx_bytes, threads, level):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return ort.InferenceSession(onnx_bytes, options, providers=providers)


def frozen_torchscript(model, example):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


# ------------------------------------------------------------------------------- statistics


def spread(samples):
    """median, quartiles (inclusive method) and extremes of a cell's samples, in ms."""
    ms = sorted(s * 1e3 for s in samples)
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else ms * 3
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0],
            "max_ms": ms[-1], "rounds": len(ms)}


def slower_beyond_noise(cell, reference):
    """Whether ``cell`` is slower than ``reference`` by more than the noise: its fastest round
    slower than the reference's slowest. (With 5 independent rounds each, two equally fast
    cells part like this 1 time in 252; the interquartile ranges of two identical ResNet-20s,
    octave and multi-octave at alpha 0, parted in a 3-round run on this shared machine.)"""
    return cell["min_ms"] > reference["max_ms"]


def add_ratios(rows):
    """time / vanilla (ratio of medians, same network, batch and runtime) and, for
    multi-octave, time / octave at the same alpha and whether it is slower beyond the noise."""
    index = {(r["network"], r["batch"], r["runtime"], r["conv"], r["alpha"]): r for r in rows}
    for r in rows:
        key = (r["network"], r["batch"], r["runtime"])
        vanilla = index[key + ("vanilla", None)]
        r["time_vs_vanilla"] = r["median_ms"] / vanilla["median_ms"]
        r["time_vs_flops"] = r["time_vs_vanilla"] / r["flops_ratio"]
        if r["conv"] == "multi-octave":
            octave = index.get(key + ("octave", r["alpha"]))
            if octave is not None:
                r["time_vs_octave"] = r["median_ms"] / octave["median_ms"]
                r["slower_than_octave_beyond_noise"] = slower_beyond_noise(r, octave)
    return rows


def verdicts(rows):
    """The issue's two targets as (line, met or None where not measured)."""
    t = TARGET
    candidates = [r for r in rows if r["network"] == t["network"] and r["batch"] == t["batch"]
                  and r["alpha"] == t["alpha"] and r["conv"] in OCTAVE_MODES]
    out = []
    if not candidates:
        out.append((f"Oct-ResNet-50 alpha {t['alpha']} batch {t['batch']} within "
                    f"{t['slack']}x of its FLOPs ratio: not measured in this run", None))
    else:
        best = min(candidates, key=lambda r: r["time_vs_flops"])
        bound = t["slack"] * best["flops_ratio"]
        met = best["time_vs_vanilla"] <= bound
        others = ", ".join(f"{r['runtime']} {r['conv']} {r['time_vs_vanilla']:.3f}x"
                           for r in candidates if r is not best)
        out.append((f"Oct-ResNet-50 alpha {t['alpha']} batch {t['batch']}: best {best['runtime']} "
                    f"{best['conv']} at {best['time_vs_vanilla']:.3f}x vanilla's latency against "
                    f"<= {bound:.3f}x ({t['slack']} x FLOPs ratio {best['flops_ratio']:.3f})"
                    + (f"; {others}" if others else ""), met))
    paired = [r for r in rows if "slower_than_octave_beyond_noise" in r]
    slower = [r for r in paired if r["slower_than_octave_beyond_noise"]]
    if not paired:
        out.append(("multi-octave never slower than octave beyond the noise: not measured", None))
    else:
        out.append((f"multi-octave never slower than octave beyond the noise (its fastest "
                    f"round slower than octave's slowest): {len(slower)} of {len(paired)} cells slower"
                    + ("" if not slower else ": " + ", ".join(
                        f"{r['network']} b{r['batch']} a{r['alpha']} {r['runtime']} "
                        f"{r['time_vs_octave']:.3f}x" for r in slower)), not slower))
    return out


# ------------------------------------------------------------------------------- measuring


def build_models(key, alphas, device):
    """[(conv, alpha, model, flops ratio counted, theoretical)] of one network, eval mode."""
    label, build, size = NETWORKS[key]
    configs = [("vanilla", None)] + [(m, a) for a in alphas for m in OCTAVE_MODES]
    out, vanilla_flops = [], None
    for conv, alpha in configs:
        torch.manual_seed(0)
        model = build(conv, 0.5 if alpha is None else alpha).eval()
        flops = count_flops_per_image(model, (3, size, size))
        if conv == "vanilla":
            vanilla_flops, theory = flops, 1.0
        elif key == "seed":
            theory = seed_theoretical_ratio(conv, alpha, 1)
        else:
            theory = theoretical_flops_ratio(model.conv_specs(size))
        out.append((conv, alpha, model.to(device), flops / vanilla_flops, theory))
    return out


def prepare_runtimes(models, key, args, device, notes):
    """Per model (conv, alpha, FLOPs ratios, {runtime: call(inputs)}, the model): eager torch
    and TorchScript now; ONNX Runtime per batch size (:func:`add_onnx_runners`)."""
    size = NETWORKS[key][2]
    example = torch.randn(1, 3, size, size).to(device).contiguous(memory_format=torch.channels_last)
    prepared = []
    for conv, alpha, model, flops_ratio, theory in models:
        model = model.to(memory_format=torch.channels_last)
        runners = {}

        def eager(x, m=model):
            with torch.inference_mode():
                return m(x["eager"])

        runners["eager"] = eager
        if "torchscript" in args.runtimes:
            frozen = frozen_torchscript(model, example)

            def script(x, m=frozen):
                with torch.no_grad():
                    return m(x["eager"])

            runners["torchscript"] = script
        prepared.append((conv, alpha, flops_ratio, theory, runners, model))
    return prepared


def add_onnx_runners(prepared, key, batch, args, device, notes):
    """Export every model for this batch size and put its ONNX Runtime session among its
    runners, after checking its logits against eager torch's on a random batch.

    Fixed shapes by default: with a dynamic batch dimension octconv's upsampling to the
    high-frequency part's size stays a Shape -> Gather -> Concat -> Resize subgraph and
    BatchNorm after an octave add stays unfolded: Oct-ResNet-50 ran 870-1131 nodes against
    311-351 with fixed shapes (vanilla: 59 either way)."""
    if "onnxruntime" not in args.runtimes:
        return
    ort, providers = onnxruntime_or_reason(device)
    if ort is None:
        if not any(n.startswith("ONNX Runtime column skipped") for n in notes):
            print(f"  ONNX Runtime column skipped: {providers}", flush=True)
        notes.append(f"ONNX Runtime column skipped: {providers}")
        return
    size = NETWORKS[key][2]
    x = torch.randn(batch, 3, size, size)
    for conv, alpha, _, _, runners, model in prepared:
        runners.pop("onnxruntime", None)  # the previous batch size's session, freed first
        t0 = time.perf_counter()
        dynamic = args.onnx_batch == "dynamic"
        onnx_bytes = export_onnx(model.cpu(), x[:1] if dynamic else x, dynamic=dynamic)
        model.to(device)
        session = ort_session(ort, providers, onnx_bytes, args.threads, args.ort_opt)
        del onnx_bytes
        export_s = time.perf_counter() - t0
        runner = (lambda inputs, s=session: s.run(None, {"images": inputs["numpy"]})[0])
        with torch.inference_mode():
            want = model(x.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
        got = torch.from_numpy(runner({"numpy": x.numpy()}))
        error = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
        if not error <= MATCH_TOLERANCE:
            raise SystemExit(f"error: {key} {conv} alpha {alpha} batch {batch}: ONNX Runtime's "
                             f"logits differ from eager torch's by {error:.2e} of their scale "
                             f"(> {MATCH_TOLERANCE}): the export is wrong, not timed")
        runners["onnxruntime"] = runner
        print(f"  {key} {conv} alpha {alpha} batch {batch}: exported and loaded in {export_s:.1f} s, "
              f"ONNX Runtime matches eager to {error:.1e}", flush=True)


def time_group(key, batch, prepared, args, device):
    """Rows for every (model, runtime) of one network at one batch size, timed interleaved."""
    size = NETWORKS[key][2]
    x = torch.randn(batch, 3, size, size)
    inputs = {"eager": x.to(device).contiguous(memory_format=torch.channels_last),
              "numpy": x.numpy()}
    cells = [(conv, alpha, runtime) for conv, alpha, _, _, runners, _ in prepared
             for runtime in runners]
    calls = {(conv, alpha, rt): runners[rt] for conv, alpha, _, _, runners, _ in prepared
             for rt in runners}
    inner = {}
    for cell in cells:
        fn = calls[cell]
        for _ in range(args.warmup):
            fn(inputs)
        sync(device)
        t0 = time.perf_counter()
        fn(inputs)
        sync(device)
        once = time.perf_counter() - t0
        inner[cell] = max(1, min(1000, int(round(args.sample_s / max(once, 1e-6)))))
    samples = {cell: [] for cell in cells}
    for _, cell in rotating_rounds(cells, args.rounds):
        fn, n = calls[cell], inner[cell]
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(inputs)
        sync(device)
        samples[cell].append((time.perf_counter() - t0) / n)
    rows = []
    for conv, alpha, flops_ratio, theory, runners, _ in prepared:
        for runtime in runners:
            cell = (conv, alpha, runtime)
            rows.append({"network": key, "label": NETWORKS[key][0], "size": size, "batch": batch,
                         "conv": conv, "alpha": alpha, "runtime": runtime,
                         "flops_ratio": flops_ratio, "flops_ratio_theoretical": theory,
                         "calls_per_sample": inner[cell], **spread(samples[cell])})
    return rows


# ------------------------------------------------------------------------------- report


def machine():
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = ("AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else "")
    except OSError:
        pass
    return f"{name}{', ' + flags if flags else ''}, {os.cpu_count()} cores"


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def table(r):
    runtimes = [rt for rt in RUNTIMES if any(row["runtime"] == rt for row in r["rows"])]
    names = {"eager": "eager", "onnxruntime": "ORT", "torchscript": "TorchScript frozen"}
    lines = [f"octconv-exp inference benchmark — {r['device']} — torch {r['torch']}"
             f"{' — onnxruntime ' + r['onnxruntime'] if r.get('onnxruntime') else ''} — "
             f"{r['threads']} threads — {r['rounds']} interleaved rounds — load average "
             f"{r['load_average_start']} at the start, {r['load_average_end']} at the end", ""]
    lines += [f"note: {n}" for n in r["notes"]]
    head = "| network | batch | conv | alpha | FLOPs / vanilla |"
    rule = "| --- | --- | --- | --- | --- |"
    for rt in runtimes:
        head += f" {names[rt]} ms, median [IQR] | {names[rt]} / vanilla |"
        rule += " --- | --- |"
    lines += ["Latency per batch (median of the rounds; IQR: the middle half of the rounds)",
              head, rule]
    index = {(row["network"], row["batch"], row["conv"], row["alpha"], row["runtime"]): row
             for row in r["rows"]}
    seen = []
    for row in r["rows"]:
        key = (row["network"], row["batch"], row["conv"], row["alpha"])
        if key in seen:
            continue
        seen.append(key)
        line = (f"| {row['label']} {row['size']}x{row['size']} | {row['batch']} | {row['conv']} | "
                f"{'—' if row['alpha'] is None else row['alpha']} | {row['flops_ratio']:.3f} |")
        for rt in runtimes:
            cell = index.get(key + (rt,))
            if cell is None:
                line += " — | — |"
                continue
            line += (f" {_ms(cell['median_ms'])} [{_ms(cell['q1_ms'])}–{_ms(cell['q3_ms'])}] | "
                     f"{cell['time_vs_vanilla']:.3f} |")
        lines.append(line)
    lines += ["", "Verdict:"]
    for text, met in r["verdicts"]:
        lines.append(f"  [{'—' if met is None else 'met' if met else 'MISSED'}] {text}")
    return "\n".join(lines)


def _ms(v):
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    parser.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime"], choices=RUNTIMES)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and ONNX Runtime intra-op threads (default 1: on a shared "
                             "2-core machine 2 threads made ResNet-50 6x slower, each parallel "
                             "region waiting for a descheduled thread)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per cell")
    parser.add_argument("--sample-s", type=float, default=0.05,
                        help="seconds one sample of a cell lasts at least (calls averaged)")
    parser.add_argument("--onnx-batch", default="static", choices=["static", "dynamic"],
                        help="export per batch size with fixed shapes (static), or once with a "
                             "dynamic batch dimension")
    parser.add_argument("--ort-opt", default="all", choices=["disable", "basic", "extended", "all"],
                        help="ONNX Runtime graph optimisation level")
    parser.add_argument("--quick", action="store_true",
                        help="a short check of the script: seed CNN and ResNet-20, batch 1, "
                             "alphas 0 and 0.5, 3 rounds")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/inference-<device>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.networks, args.batches, args.alphas = ["seed", "resnet20"], [1], [0.0, 0.5]
        args.rounds, args.warmup, args.sample_s = 3, 1, 0.005
    for name, values, ok in (("--batches", args.batches, lambda v: v >= 1),
                             ("--alphas", args.alphas, lambda v: 0 <= v < 1),
                             ("--rounds", [args.rounds], lambda v: v >= 1),
                             ("--threads", [args.threads], lambda v: v >= 1)):
        bad = [v for v in values if not ok(v)]
        if bad:
            sys.stderr.write(f"error: {name}: {bad[0]} is out of range\n")
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("error: --device cuda: no CUDA device is available here\n")
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    ort, _ = onnxruntime_or_reason(device) if "onnxruntime" in args.runtimes else (None, None)
    r = {"device": (f"cuda ({torch.cuda.get_device_name(0)})" if device.type == "cuda"
                    else f"cpu ({machine()})"),
         "torch": torch.__version__, "onnxruntime": getattr(ort, "__version__", None),
         "threads": args.threads, "rounds": args.rounds, "ort_opt": args.ort_opt,
         "onnx_batch": args.onnx_batch,
         "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_start": load_average(),
         "quick": args.quick, "notes": [], "rows": []}
    print(f"inference bench: {r['device']}, torch {r['torch']}, {args.threads} threads, "
          f"load average {r['load_average_start']}", flush=True)
    started = time.perf_counter()
    for key in args.networks:
        models = build_models(key, args.alphas, device)
        prepared = prepare_runtimes(models, key, args, device, r["notes"])
        for batch in args.batches:
            add_onnx_runners(prepared, key, batch, args, device, r["notes"])
            r["rows"] += time_group(key, batch, prepared, args, device)
            print(f"  {key} batch {batch} timed ({time.perf_counter() - started:.0f} s so far)",
                  flush=True)
        del models, prepared
    r["notes"] = sorted(set(r["notes"]))
    add_ratios(r["rows"])
    r["verdicts"] = verdicts(r["rows"])
    r["load_average_end"] = load_average()
    r["seconds"] = time.perf_counter() - started
    print(table(r) + "\n", flush=True)
    out = args.out or os.path.join(HERE, "results", f"inference-{device.type}.json")
    write_results(out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
