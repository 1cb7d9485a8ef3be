"""octconv-exp benchmark: speed.malloc on and off, per conv mode, on the CPU.

    make bench                                  # writes bench/results/malloc-cpu.json
    .venv/bin/python bench/bench_malloc.py --rounds 5
    .venv/bin/python bench/bench_malloc.py --quick

Each measurement is a fresh process (glibc's thresholds depend on the process's allocation
history, which is the point): it builds bench_cuda.py's training step for the model
(channels_last, fp32, SGD with momentum), applies ``speed.malloc`` (octconv_exp/backends/allocator.py)
as a run would, takes warm-up training steps, then times training steps and counts the minor
page faults they cause (``getrusage``), reported as MiB of fresh pages per step. Processes for every case, conv mode and setting are interleaved
round-robin, the order rotating each round, and medians are kept. The last column is the time
with ``speed.malloc`` on over the time with it off, from this run only.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _shared import rotating_rounds, write_results  # noqa: E402
from bench_cuda import MODELS, MODES, make_step  # noqa: E402

from octconv_exp.backends import allocator  # noqa: E402

#: bench_cuda.MODELS keys: the end-to-end bench's larger cases, and the quick smoke run's
CASES = ("seed_exp4_b64", "resnet20_b128")
QUICK_CASES = ("seed_exp1_b8",)
#: --quick measures one conv mode (both settings, each in a process of its own): what the test
#: checks is that each child applies its setting and the table is filled, and every process
#: is a fresh interpreter (about 5 s of imports on 2 busy cores).
QUICK_MODES = ("multi-octave",)


def child(case, mode, setting, warmup, steps):
    """One process's measurement: (ms per step, MiB of fresh pages per step, decision).
    The training step is bench_cuda's (channels_last, fp32, on the CPU)."""
    decision = allocator.apply(setting, "cpu")
    build, batch = {key: (b, n) for key, b, n in MODELS}[case]
    step = make_step(build, mode, batch, torch.device("cpu"), channels_last=True, bf16=False)
    for _ in range(warmup):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    page = os.sysconf("SC_PAGE_SIZE")
    return {"ms_per_step": seconds / steps * 1e3,
            "fresh_mib_per_step": faults * page / steps / 2 ** 20, "malloc": decision}


def measure(cases, rounds, warmup, steps, modes=MODES):
    jobs = [(case, mode, setting) for case in cases for mode in modes
            for setting in ("false", "auto")]
    samples = {job: [] for job in jobs}
    decisions = {}
    for r, (key, mode, setting) in rotating_rounds(jobs, rounds):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", key, mode, setting,
               str(warmup), str(steps)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [""]
            raise SystemExit(f"error: {key} {mode} speed.malloc={setting} failed: {tail[0]}")
        m = json.loads(done.stdout.strip().splitlines()[-1])
        samples[(key, mode, setting)].append(m)
        decisions[setting] = m["malloc"]
        print(f"  round {r + 1}/{rounds}: {key} {mode} speed.malloc={setting}: "
              f"{m['ms_per_step']:.1f} ms, {m['fresh_mib_per_step']:.1f} MiB fresh per step",
              file=sys.stderr, flush=True)
    rows = []
    for key in cases:
        for mode in modes:
            row = {"case": key, "conv": mode}
            for setting, name in (("false", "off"), ("auto", "on")):
                s = samples[(key, mode, setting)]
                row[f"ms_{name}"] = statistics.median(m["ms_per_step"] for m in s)
                row[f"fresh_mib_{name}"] = statistics.median(m["fresh_mib_per_step"] for m in s)
            row["time_on_over_off"] = row["ms_on"] / row["ms_off"]
            rows.append(row)
    return rows, decisions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "malloc-cpu.json"))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, mode, setting, warmup, steps = args.child
        print(json.dumps(child(case, mode, setting, int(warmup), int(steps))))
        return
    cases, modes, rounds, warmup, steps = ((QUICK_CASES, QUICK_MODES, 1, 1, 2) if args.quick
                                           else (CASES, MODES, args.rounds, 4, args.steps))
    print(f"octconv-exp speed.malloc benchmark — cpu ({platform.machine()}) — torch "
          f"{torch.__version__} — {torch.get_num_threads()} threads — training steps, "
          f"channels_last, alpha 0.5, one process each, median of {rounds} interleaved "
          f"rounds\n")
    rows, decisions = measure(cases, rounds, warmup, steps, modes)
    print("| case | conv | ms/step off | ms/step on | fresh MiB/step off | fresh MiB/step on "
          "| time on / off |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['conv']} | {r['ms_off']:.1f} | {r['ms_on']:.1f} | "
              f"{r['fresh_mib_off']:.1f} | {r['fresh_mib_on']:.1f} | "
              f"{r['time_on_over_off']:.3f} |", flush=True)
    print(f"\nspeed.malloc=auto here: {decisions.get('auto')}")
    write_results(args.out, {"device": "cpu", "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "rounds": rounds,
                             "steps": steps, "quick": args.quick, "decisions": decisions,
                             "rows": rows})


if __name__ == "__main__":
    main()
