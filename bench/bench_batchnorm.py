"""octconv-exp benchmark: multi-octave's narrow-channel BatchNorm against torch's, on the CPU.

    make bench                                  # writes bench/results/batchnorm-cpu.json
    .venv/bin/python bench/bench_batchnorm.py --quick

Forward + backward of one training-mode BatchNorm over a channels-last tensor, torch's
``nn.BatchNorm2d`` against :func:`octconv_exp.models.batchnorm.wide_batch_norm` (the wide-view path,
whatever the shape), interleaved round-robin, medians. The shapes are the per-frequency tensors
of ResNet-20 (batch 128) at alpha 0.5 and 0.25, the seed CNN's defaults (batch 8), and channel
counts where torch's kernel is already fast (16, 32), which the product leaves to torch. The
last column says which one a multi-octave run uses for that shape (``uses_wide_path``).
"""
import argparse
import os
import platform
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _shared import interleaved, warm, write_results  # noqa: E402

from octconv_exp.models import batchnorm  # noqa: E402

#: (what, N, C, H): per-frequency BatchNorm inputs of the models the end-to-end bench runs
SHAPES = (
    ("ResNet-20 b128 a0.5 stage 1 high", 128, 8, 32),
    ("ResNet-20 b128 a0.5 stage 1 low", 128, 8, 16),
    ("ResNet-20 b128 a0.25 stage 1 high", 128, 12, 32),
    ("ResNet-20 b128 a0.25 stage 1 low", 128, 4, 16),
    ("ResNet-20 b128 a0.25 stage 2 high", 128, 24, 16),
    ("ResNet-20 b128 a0.5 stage 2 high", 128, 16, 16),
    ("ResNet-20 b128 a0.5 stage 3 high", 128, 32, 8),
    ("seed CNN defaults b8 layer 1 high", 8, 8, 32),
    ("seed CNN defaults b8 layer 1 low", 8, 8, 16),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "batchnorm-cpu.json"))
    args = parser.parse_args()
    repeats, inner = (2, 1) if args.quick else (args.repeats, 3)
    device = torch.device("cpu")
    print(f"octconv-exp BatchNorm benchmark — cpu ({platform.machine()}) — torch "
          f"{torch.__version__} — {torch.get_num_threads()} threads — forward + backward, "
          f"channels_last, median of {repeats} interleaved rounds\n")
    print("| tensor | N x C x H x W | torch ms | wide view ms | wide / torch | multi-octave uses |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for what, n, c, h in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn_like(x)
        bn_torch, bn_wide = nn.BatchNorm2d(c), nn.BatchNorm2d(c)

        def run(norm, bn):
            def step():
                x.grad = None
                norm(bn, x).backward(grad)
            return step
        fns = {"torch": run(lambda bn, t: bn(t), bn_torch),
               "wide": run(batchnorm.wide_batch_norm, bn_wide)}
        warm(fns, 1 if args.quick else 3)
        t = interleaved(fns, repeats, inner, device)
        uses = "wide view" if batchnorm.uses_wide_path(bn_wide, x) else "torch"
        ratio = t["wide"] / t["torch"]
        rows.append({"tensor": what, "shape": [n, c, h, h], "torch_ms": t["torch"] * 1e3,
                     "wide_ms": t["wide"] * 1e3, "wide_over_torch": ratio, "uses": uses})
        print(f"| {what} | {n} x {c} x {h} x {h} | {t['torch'] * 1e3:.3f} | "
              f"{t['wide'] * 1e3:.3f} | {ratio:.2f} | {uses} |", flush=True)
    wrong = [r["tensor"] for r in rows if (r["uses"] == "wide view") != (r["wide_over_torch"] < 1)]
    print("\nshapes where multi-octave's choice was the slower one in this run: "
          + (", ".join(wrong) if wrong else "none"))
    write_results(args.out, {"device": "cpu", "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "quick": args.quick,
                             "rows": rows})


if __name__ == "__main__":
    main()
