"""The CUDA column of docs/performance.md in one run: everything `make bench` measures on the
CPU, on a GPU, plus the CUDA-only speed settings and torch.compile.

    .venv/bin/python bench/bench_cuda.py                       # writes bench/results/cuda-*.json
    .venv/bin/python bench/bench_cuda.py --out-dir "$OUT"      # on a lent GPU machine

Sections (each its own results file, so a run cut short keeps what it finished):

1. ``cuda-settings.json``: training steps (seed CNN at expansion 4 batch 64 and at the seed's
   defaults, ResNet-20 at batch 128; alpha 0.5) of vanilla / octave / multi-octave under each
   speed setting (fp32 channels-first, channels_last, bf16 autocast, cudnn.benchmark, all of
   them), interleaved round-robin, medians; time relative to vanilla in the same setting and
   to the fp32 channels-first step.
2. ``cuda-compile.json``: torch.compile per conv mode and model: seconds until the first
   compiled steps are done, then the compiled step time against eager, and the
   ``COMPILE_MEASURED["cuda"]`` entry (octconv_exp/backends/native.py) these numbers give.
3. ``cuda-layers.json``: bench/bench_octconv.py's tables on CUDA (single layer, model grid,
   memory formats, framework overhead, ResNets).
4. ``end_to_end-cuda.json``: bench/bench_end_to_end.py --device cuda: whole epochs through
   run.py with the defaults.
5. ``cuda-inference.json``: bench/bench_inference.py --device cuda: the inference table
   (Oct-ResNet-50, ResNet-20, seed CNN; batch 1 and 32; every alpha) in eager torch on the GPU,
   synchronised around every timed sample, and under ONNX Runtime's CUDA execution provider
   where the installed onnxruntime has one (onnxruntime-gpu; else that column is skipped with
   the reason printed). ONNX Runtime's times include copying the input to the GPU and the
   logits back; eager torch's input already lies on the GPU.

``--device cpu --quick`` runs the same code on the CPU in a few minutes (a check of the script,
not a measurement).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _shared import interleaved, sync, warm, write_results  # noqa: E402
from octconv_exp.models.octave import ClassificationModel  # noqa: E402
from octconv_exp.models.resnet import ResNetCifar  # noqa: E402

MODES = ("vanilla", "octave", "multi-octave")
#: (key, builder, batch)
MODELS = (
    ("seed_exp4_b64", lambda mode: ClassificationModel(mode, 0.5, 4), 64),
    ("seed_exp1_b8", lambda mode: ClassificationModel(mode, 0.5, 1), 8),
    ("resnet20_b128", lambda mode: ResNetCifar(20, conv_mode=mode, alpha=0.5), 128),
)
#: what metrics.json's "model" (octconv_exp.models.octave.model_name) calls each
MODEL_NAMES = {"seed_exp4_b64": "seed_cnn", "seed_exp1_b8": "seed_cnn",
               "resnet20_b128": "resnet_cifar-20"}
#: name -> (channels_last, bf16 autocast, cudnn.benchmark)
SETTINGS = {
    "fp32": (False, False, False),
    "channels_last": (True, False, False),
    "bf16": (False, True, False),
    "cudnn_benchmark": (False, False, True),
    "all": (True, True, True),
}


def make_step(build, mode, batch, device, channels_last, bf16, compiled=False):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build(mode).to(device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    runnable = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = runnable(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()

    return step


def settings_section(device, args):
    rows = []
    for key, build, batch in args.selected:
        fns = {}
        for setting, (cl, bf16, bench) in SETTINGS.items():
            if bf16 and device.type != "cuda":
                continue
            for mode in MODES:
                fns[(setting, mode)] = (bench, make_step(build, mode, batch, device, cl, bf16))
        # cudnn.benchmark is process-wide: set it per call.
        calls = {k: (lambda b=b, f=f: (setattr(torch.backends.cudnn, "benchmark", b), f()))
                 for k, (b, f) in fns.items()}
        warm(calls, args.warmup)
        t = interleaved(calls, args.rounds, args.inner, device)
        torch.backends.cudnn.benchmark = False
        for (setting, mode), seconds in t.items():
            rows.append({"model": key, "batch": batch, "setting": setting, "conv": mode,
                         "train_images_per_second": batch / seconds,
                         "time_vs_vanilla": seconds / t[(setting, "vanilla")],
                         "time_vs_octave": seconds / t[(setting, "octave")],
                         "time_vs_fp32": seconds / t[("fp32", mode)]})
        print(f"  settings: {key} done", file=sys.stderr, flush=True)
    return rows


def compile_section(device, args):
    rows = []
    for key, build, batch in args.selected:
        for mode in MODES:
            eager = make_step(build, mode, batch, device, device.type == "cpu", False)
            sync(device)
            t0 = time.perf_counter()
            compiled = make_step(build, mode, batch, device, device.type == "cpu", False,
                                 compiled=True)
            for _ in range(2):
                compiled()
            sync(device)
            warmup = time.perf_counter() - t0
            warm({"eager": eager}, args.warmup)
            t = interleaved({"eager": eager, "compiled": compiled}, args.rounds, args.inner, device)
            rows.append({"model": key, "batch": batch, "conv": mode,
                         "compile_warmup_s": warmup, "eager_step_ms": t["eager"] * 1e3,
                         "compiled_step_ms": t["compiled"] * 1e3,
                         "compiled_vs_eager": t["compiled"] / t["eager"]})
            print(f"  compile: {key} {mode}: {warmup:.1f} s, "
                  f"{t['compiled'] / t['eager']:.3f}x eager", file=sys.stderr, flush=True)
            torch._dynamo.reset()
    entry = compile_entry(rows)
    print(f"COMPILE_MEASURED[{device.type!r}] = {json.dumps(entry)}", flush=True)
    return {"rows": rows, "COMPILE_MEASURED_entry": {device.type: entry}}


def compile_entry(rows):
    """octconv_exp/backends/native.py COMPILE_MEASURED's entry for one device: per model (as
    metrics.json names it) and conv mode, the longest compilation and the least favourable
    compiled/eager ratio over the sizes measured."""
    entry = {}
    for r in rows:
        key = f"{MODEL_NAMES[r['model']]}/{r['conv']}"
        warmup, ratio = entry.get(key, (0.0, 0.0))
        entry[key] = (round(max(warmup, r["compile_warmup_s"]), 1),
                      round(max(ratio, r["compiled_vs_eager"]), 3))
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sections", nargs="*",
                        default=["settings", "compile", "layers", "e2e", "inference"],
                        choices=["settings", "compile", "layers", "e2e", "inference"])
    parser.add_argument("--models", nargs="*", default=[m[0] for m in MODELS],  # noqa
                        choices=[m[0] for m in MODELS])
    parser.add_argument("--quick", action="store_true", help="a check of the script")
    args = parser.parse_args(argv)
    args.selected = tuple(m for m in MODELS if m[0] in args.models)
    if args.quick:
        args.rounds, args.inner, args.warmup = 1, 1, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("error: --device cuda: no CUDA device is available here\n")
        return 2
    device = torch.device(args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    head = {"device": (torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "rounds": args.rounds, "inner": args.inner, "quick": args.quick}
    prefix = "cuda" if device.type == "cuda" else "cpu-check"
    if "settings" in args.sections:
        write_results(os.path.join(args.out_dir, f"{prefix}-settings.json"),
              {**head, "rows": settings_section(device, args)})
    if "compile" in args.sections:
        write_results(os.path.join(args.out_dir, f"{prefix}-compile.json"),
              {**head, **compile_section(device, args)})
    py = sys.executable
    if "layers" in args.sections:
        cmd = [py, os.path.join(HERE, "bench_octconv.py"), "--device", args.device,
               "--out", os.path.join(args.out_dir, f"{prefix}-layers.json")]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    if "e2e" in args.sections:
        cmd = [py, os.path.join(HERE, "bench_end_to_end.py"), "--device", args.device,
               "--rounds", "1" if args.quick else "3",
               "--out", os.path.join(args.out_dir, f"end_to_end-{prefix}.json")]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    if "inference" in args.sections:
        cmd = [py, os.path.join(HERE, "bench_inference.py"), "--device", args.device,
               "--out", os.path.join(args.out_dir, f"{prefix}-inference.json")]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
