"""octconv-exp end-to-end benchmark: whole training epochs through run.py, as a user runs them.

    make bench                                   # part of it; or alone:
    .venv/bin/python bench/bench_end_to_end.py   # CPU, writes bench/results/end_to_end-cpu.json
    .venv/bin/python bench/bench_end_to_end.py --device cuda --rounds 3

Each run is ``python run.py dataset=synthetic conv=MODE alpha=0.5 ... trainer.epochs=1`` in its
own process, with every other setting at its default (speed.channels_last=auto,
speed.compile=auto, speed.malloc=auto, the progress bar, ...): what metrics.json reports as
``train_images_per_second`` is the whole training epoch (loader, steps, bookkeeping). The runs
of all cases and conv modes are interleaved round-robin, the order rotating every round, so a
busy moment of a shared machine hits them alike, and the median over rounds is kept. It prints
ratios measured in this one run beside the counted FLOPs ratio, and checks them against the
targets below.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _shared import rotating_rounds, write_results  # noqa: E402
MODES = ("vanilla", "octave", "multi-octave")

#: (key, label, overrides): the issue's seed CNN at expansion 4 batch 64, ResNet-20 at He et
#: al.'s batch 128, and the seed's own defaults (expansion 1, batch 8).
CASES = (
    ("seed_exp4_b64", "seed CNN, expansion 4, batch 64",
     ["expansion=4", "trainer.batch_size=64", "dataset.train_size=6144"]),
    ("resnet20_b128", "ResNet-20, batch 128",
     ["model=resnet_cifar", "model.depth=20", "trainer.batch_size=128",
      "dataset.train_size=3072"]),
    ("seed_defaults", "seed CNN defaults (expansion 1, batch 8)",
     ["dataset.train_size=6144"]),
)
COMMON = ["dataset=synthetic", "dataset.test_size=500", "alpha=0.5", "trainer.epochs=1",
          "trainer.checkpoint=false", "trainer.save_model=false"]

#: (case, what, bound): multi-octave at least 10 % faster than octconv where the arithmetic
#: dominates, never more than 10 % above its FLOPs ratio to vanilla there, and no slower than
#: vanilla at the seed's defaults.
TARGETS = (
    ("seed_exp4_b64", "multi-octave time / octave time", 0.90),
    ("seed_exp4_b64", "multi-octave time / vanilla time, over its FLOPs ratio", 1.10),
    ("resnet20_b128", "multi-octave time / octave time", 0.90),
    ("resnet20_b128", "multi-octave time / vanilla time, over its FLOPs ratio", 1.10),
    ("seed_defaults", "multi-octave time / vanilla time", 1.00),
)


def run_once(case_overrides, mode, device, out_dir, extra):
    """One run.py training run; its metrics.json."""
    cmd = [sys.executable, os.path.join(REPO, "run.py"), *COMMON, *case_overrides,
           f"conv={mode}", f"device={device}", f"hydra.run.dir={out_dir}", *extra]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[1:])} failed ({res.returncode}): "
                         f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ''}")
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


def measure(args):
    cases = [c for c in CASES if not args.cases or c[0] in args.cases]
    jobs = [(key, mode) for key, _, _ in cases for mode in MODES]
    overrides = {key: o for key, _, o in cases}
    samples = {job: [] for job in jobs}
    meta = {}
    with tempfile.TemporaryDirectory(prefix="octconv-bench-") as tmp:
        for r, (key, mode) in rotating_rounds(jobs, args.rounds):
            out = os.path.join(tmp, f"{key}-{mode}-{r}")
            m = run_once(overrides[key], mode, args.device, out, args.extra)
            samples[(key, mode)].append(m["train_images_per_second"])
            meta[(key, mode)] = {k: m.get(k) for k in (
                "flops_ratio", "flops_per_image", "torch_threads", "compiled",
                "compile_decision", "device", "batch_size", "model")}
            print(f"  round {r + 1}/{args.rounds}: {key} {mode}: "
                  f"{m['train_images_per_second']:.0f} img/s", file=sys.stderr, flush=True)
    rows = []
    for key, label, _ in cases:
        med = {mode: statistics.median(samples[(key, mode)]) for mode in MODES}
        for mode in MODES:
            s = samples[(key, mode)]
            rows.append({
                "case": key, "label": label, "conv": mode, "alpha": 0.5,
                "train_images_per_second": med[mode], "samples": s,
                "spread": (max(s) - min(s)) / med[mode],
                # time ratios: images/s inverted
                "time_vs_vanilla": med["vanilla"] / med[mode],
                "time_vs_octave": med["octave"] / med[mode],
                **meta[(key, mode)],
            })
    return rows


def _row(rows, case, conv):
    return next(r for r in rows if r["case"] == case and r["conv"] == conv)


def target_values(rows):
    out = []
    for case, what, bound in TARGETS:
        if not any(r["case"] == case for r in rows):
            continue
        mo = _row(rows, case, "multi-octave")
        if what.endswith("octave time"):
            value = mo["time_vs_octave"]
        elif "FLOPs" in what:
            value = mo["time_vs_vanilla"] / mo["flops_ratio"]
        else:
            value = mo["time_vs_vanilla"]
        out.append({"case": case, "what": what, "value": value, "bound": bound,
                    "met": value <= bound})
    return out


def table(r):
    lines = [f"octconv-exp end-to-end benchmark — {r['device']} — torch {r['torch']} — "
             f"{r['threads']} threads — run.py defaults (speed.channels_last=auto, "
             f"speed.compile=auto, speed.malloc=auto) — median of {r['rounds']} interleaved "
             "rounds, alpha 0.5", "",
             "| case | conv | train img/s (epoch) | time / vanilla | time / octave | "
             "counted FLOPs / vanilla | spread over rounds | compiled |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in r["rows"]:
        lines.append(f"| {m['label']} | {m['conv']} | {m['train_images_per_second']:.0f} | "
                     f"{m['time_vs_vanilla']:.3f} | {m['time_vs_octave']:.3f} | "
                     f"{m['flops_ratio']:.3f} | {m['spread']:.0%} | "
                     f"{'yes' if m['compiled'] else 'no'} |")
    lines += ["", "Targets:"]
    for t in r["targets"]:
        lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['case']}: {t['what']} <= "
                     f"{t['bound']:.2f}: {t['value']:.3f}")
    decisions = sorted({m["compile_decision"] for m in r["rows"] if m.get("compile_decision")})
    if decisions:
        lines += ["", "speed.compile: " + "; ".join(decisions)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="*", choices=[c[0] for c in CASES], default=None)
    parser.add_argument("--out", default=None,
                        help="JSON file (default bench/results/end_to_end-<device>.json)")
    parser.add_argument("--quick", action="store_true",
                        help="one round on small data sets (a smoke run, not a measurement)")
    parser.add_argument("extra", nargs="*", help="further run.py overrides for every run, "
                        "e.g. speed.channels_last=false")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.extra = args.extra + ["dataset.train_size=512"]
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("error: --device cuda: no CUDA device is available here\n")
        return 2
    name = (torch.cuda.get_device_name(0) if args.device == "cuda"
            else (platform.processor() or platform.machine()))
    r = {"device": f"{args.device} ({name})", "torch": torch.__version__,
         "threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
         "rounds": args.rounds, "extra_overrides": args.extra, "quick": args.quick}
    r["rows"] = measure(args)
    r["targets"] = target_values(r["rows"])
    out = args.out or os.path.join(HERE, "results", f"end_to_end-{args.device}.json")
    print(table(r) + "\n")
    write_results(out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
