"""What the benchmark scripts share: interleaved timing, the order of interleaved runs, warm-up,
and writing a results file."""
import json
import os
import statistics
import time


def sync(device):
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved(fns, repeats, inner, device):
    """Median seconds per call of each fn, measured round-robin ``repeats`` times."""
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def rotating_rounds(jobs, rounds):
    """``(round, job)`` for every job in every round, round-robin, the order rotating by one
    job each round, so no job always runs first or right after the same neighbour."""
    for r in range(rounds):
        shift = r % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            yield r, job


def warm(fns, n):
    for fn in fns.values():
        for _ in range(n):
            fn()


def write_results(path, results):
    """``results`` as indented JSON at ``path`` (its folder created); says where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"written: {path}", flush=True)
