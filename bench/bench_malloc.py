"""octconv-exp benchmark: speed.malloc on and off, per conv mode, on the CPU.

    make bench                                  # writes bench/results/malloc-cpu.json
    .venv/bin/python bench/bench_malloc.py --rounds 5
    .venv/bin/python bench/bench_malloc.py --quick

Each measurement is a fresh process (glibc's thresholds depend on the process's allocation
history, which is the point): it builds the model in channels_last memory, applies
``speed.malloc`` (octconv_exp/allocator.py) as a run would, takes warm-up training steps, then
times training steps and counts the minor page faults they cause (``getrusage``), reported as
MiB of fresh pages per step. Processes for every case, conv mode and setting are interleaved
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

from _shared import write_results  # noqa: E402

MODES = ("vanilla", "octave", "multi-octave")
#: (key, label, model, expansion, batch): the end-to-end bench's larger cases
CASES = (
    ("seed_exp4_b64", "seed CNN, expansion 4, batch 64", "seed", 4, 64),
    ("resnet20_b128", "ResNet-20, batch 128", "resnet20", 1, 128),
)
QUICK_CASES = (("seed_exp1_b8", "seed CNN, expansion 1, batch 8", "seed", 1, 8),)


def child(model_kind, expansion, batch, mode, setting, warmup, steps):
    """One process's measurement: (ms per step, MiB of fresh pages per step, decision)."""
    import torch
    import torch.nn.functional as F

    from octconv_exp import allocator
    from octconv_exp.model import ClassificationModel
    from octconv_exp.resnet import ResNetCifar

    decision = allocator.apply(setting, "cpu")
    torch.manual_seed(0)
    cl = torch.channels_last
    if model_kind == "seed":
        model = ClassificationModel(mode, 0.5, expansion).to(memory_format=cl)

        def loss_of(x, y):
            return model(x, y)[1]
    else:
        model = ResNetCifar(20, conv_mode=mode, alpha=0.5).to(memory_format=cl)

        def loss_of(x, y):
            return F.cross_entropy(model(x), y)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        opt.step()
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


def measure(cases, rounds, warmup, steps):
    jobs = [(case, mode, setting) for case in cases for mode in MODES
            for setting in ("false", "auto")]
    samples = {(c[0], m, s): [] for c, m, s in jobs}
    decisions = {}
    for r in range(rounds):
        shift = r % len(jobs)
        for case, mode, setting in jobs[shift:] + jobs[:shift]:
            key, _, kind, expansion, batch = case
            cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, str(expansion),
                   str(batch), mode, setting, str(warmup), str(steps)]
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
    for key, label, *_ in cases:
        for mode in MODES:
            row = {"case": key, "label": label, "conv": mode}
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
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, expansion, batch, mode, setting, warmup, steps = args.child
        print(json.dumps(child(kind, int(expansion), int(batch), mode, setting, int(warmup),
                               int(steps))))
        return
    cases, rounds, warmup, steps = ((QUICK_CASES, 1, 1, 2) if args.quick
                                    else (CASES, args.rounds, 4, args.steps))
    import torch

    print(f"octconv-exp speed.malloc benchmark — cpu ({platform.machine()}) — torch "
          f"{torch.__version__} — {torch.get_num_threads()} threads — training steps, "
          f"channels_last, alpha 0.5, one process each, median of {rounds} interleaved "
          f"rounds\n")
    rows, decisions = measure(cases, rounds, warmup, steps)
    print("| case | conv | ms/step off | ms/step on | fresh MiB/step off | fresh MiB/step on "
          "| time on / off |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['conv']} | {r['ms_off']:.1f} | {r['ms_on']:.1f} | "
              f"{r['fresh_mib_off']:.1f} | {r['fresh_mib_on']:.1f} | "
              f"{r['time_on_over_off']:.3f} |", flush=True)
    print(f"\nspeed.malloc=auto here: {decisions.get('auto')}")
    write_results(args.out, {"device": "cpu", "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "rounds": rounds,
                             "steps": steps, "quick": args.quick, "decisions": decisions,
                             "rows": rows})


if __name__ == "__main__":
    main()
