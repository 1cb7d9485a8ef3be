"""octconv-exp benchmark: training steps on a machine whose cores other processes keep busy.

    make bench                                  # writes bench/results/busy-cpu.json
    .venv/bin/python bench/bench_busy.py --rounds 5
    .venv/bin/python bench/bench_busy.py --quick

Researchers share workstations. This times a training step of the seed CNN at the defaults'
size (expansion 1, batch 8, 32x32 images, channels_last, alpha 0.5, SGD with momentum,
speed.malloc on: what a CPU run does) for vanilla / octave / multi-octave, under each thread
variant (:data:`DEFAULT_VARIANTS`; ``--variants`` picks from :data:`VARIANTS`: torch threads,
OMP_WAIT_POLICY, oneDNN on or off), alone and beside CPU-burning neighbours (one busy-loop
process per core, started once and held stopped, SIGSTOP, except while a busy sample is
timed). Every variant is measured in a fresh process, since the OpenMP runtime reads its
environment once, at start-up; inside it alone and busy samples alternate and the three conv
modes are timed round-robin. The variants' processes run round-robin, the order rotating each
round; the table keeps the median over rounds and the spread ((max - min) / median).

"Alone" is only as alone as the machine is: every measurement also records the load average and
how much of the machine's CPU time went to nobody (``/proc/stat`` idle) while it ran, and how
many cores the measuring process itself got (its CPU seconds per wall second).
"""
import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from _shared import rotating_rounds, write_results  # noqa: E402

MODES = ("vanilla", "octave", "multi-octave")
#: name -> (torch threads, OpenMP environment (none: libgomp's defaults), oneDNN enabled)
VARIANTS = {
    "threads=1": (1, {}, True),
    "threads=2": (2, {}, True),
    "threads=2 PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}, True),
    "threads=2 GOMP_SPINCOUNT=10000": (2, {"GOMP_SPINCOUNT": "10000"}, True),
    "threads=2 GOMP_SPINCOUNT=1000": (2, {"GOMP_SPINCOUNT": "1000"}, True),
    "threads=2 ACTIVE": (2, {"OMP_WAIT_POLICY": "ACTIVE"}, True),
    "threads=2 no oneDNN": (2, {}, False),
}
#: what `make bench` measures (about 6 minutes on the busy 2-core machine): the settings a run
#: chooses between. The others were measured for docs/performance.md (ACTIVE and oneDNN off
#: many times slower than threads=2 even alone; the spin counts no better than PASSIVE);
#: --variants measures them again
DEFAULT_VARIANTS = ("threads=1", "threads=2", "threads=2 PASSIVE")
#: the environment variables a variant starts from unset
OMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
QUICK_VARIANTS = ("threads=1", "threads=2 PASSIVE")
#: idle: the measuring process's threads real-time (SCHED_FIFO), which leaves the machine's
#: other processes the kernel's real-time throttling reserve (5 % by default): an idle machine,
#: where the bench may do that (root, CAP_SYS_NICE; elsewhere it has no idle column); alone:
#: the machine as it is; busy: beside one busy loop per core
LOADS = ("idle", "alone", "busy")
#: a neighbour: burns a core until killed, and dies with the bench (Linux's parent-death
#: signal) so that a bench killed outright leaves no busy loop behind
BURNER = ("import ctypes\ntry:\n    ctypes.CDLL(None).prctl(1, 9)\nexcept Exception:\n"
          "    pass\nwhile True:\n    pass\n")
BATCH = 8


def cpu_times():
    """(idle, total) jiffies of the whole machine, from /proc/stat (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; without guest (in user)


def set_realtime(on):
    """Every thread of this process under SCHED_FIFO (``on``) or back under the normal
    scheduler: a real-time thread takes a core from any normal process the moment it is
    runnable, which is an idle machine for it, wake-ups included (a nice value is not: a
    sleeping thread woken by OpenMP waits for the process on its core to be preempted)."""
    policy, param = ((os.SCHED_FIFO, os.sched_param(1)) if on
                     else (os.SCHED_OTHER, os.sched_param(0)))
    for tid in os.listdir("/proc/self/task"):
        os.sched_setscheduler(int(tid), policy, param)


def may_run_realtime():
    """Whether this process may run its threads real-time (root, CAP_SYS_NICE; Linux)."""
    try:
        set_realtime(True)
    except (OSError, AttributeError):
        return False
    set_realtime(False)
    return True


def child(threads, mkldnn, warmup, samples, min_seconds, neighbours):
    """One process's measurement: per load and conv mode, the median ms per training step;
    the cores the process got and the machine's idle share while it measured. Alone and busy
    alternate sample by sample: the neighbours (``neighbours``, stopped processes) run only
    while a busy sample is timed."""
    import torch

    from bench_cuda import make_step
    from octconv_exp.backends import allocator
    from octconv_exp.models.octave import ClassificationModel

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    allocator.apply("auto", "cpu")
    steps = {mode: make_step(lambda m: ClassificationModel(m, 0.5, 1), mode, BATCH,
                             torch.device("cpu"), channels_last=True, bf16=False)
             for mode in MODES}
    for step in steps.values():
        for _ in range(warmup):
            step()
    loads = LOADS if may_run_realtime() else tuple(v for v in LOADS if v != "idle")
    times = {(load, mode): [] for load in loads for mode in MODES}
    seen = {load: {"cpu": 0.0, "wall": 0.0, "idle": 0, "total": 0, "loadavg": []}
            for load in loads}
    for sample in range(samples):
        # alternating the order, so that no load always follows the same one
        for load in (loads if sample % 2 == 0 else loads[::-1]):
            if load == "busy":
                neighbours.resume()
            elif load == "idle":
                set_realtime(True)
            try:
                seen[load]["loadavg"].append(os.getloadavg()[0])
                machine = cpu_times()
                usage = resource.getrusage(resource.RUSAGE_SELF)
                start = time.perf_counter()
                for mode, step in steps.items():
                    # as many steps as fill min_seconds: one fast step is mostly clock noise
                    n, t = 0, time.perf_counter()
                    while True:
                        step()
                        n += 1
                        elapsed = time.perf_counter() - t
                        if elapsed >= min_seconds:
                            break
                    times[(load, mode)].append(elapsed / n * 1e3)
                seen[load]["wall"] += time.perf_counter() - start
                after = resource.getrusage(resource.RUSAGE_SELF)
                seen[load]["cpu"] += ((after.ru_utime - usage.ru_utime)
                                      + (after.ru_stime - usage.ru_stime))
                machine_after = cpu_times()
                if machine and machine_after:
                    seen[load]["idle"] += machine_after[0] - machine[0]
                    seen[load]["total"] += machine_after[1] - machine[1]
            finally:
                if load == "busy":
                    neighbours.pause()
                elif load == "idle":
                    set_realtime(False)
    return {"ms_per_step": {load: {mode: statistics.median(times[(load, mode)])
                                   for mode in MODES} for load in loads},
            "cores_used": {load: s["cpu"] / s["wall"] for load, s in seen.items()},
            "machine_idle": {load: (s["idle"] / s["total"] if s["total"] else None)
                             for load, s in seen.items()},
            "loadavg_1min": {load: statistics.median(s["loadavg"]) for load, s in seen.items()},
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "mkldnn": torch.backends.mkldnn.enabled}


class Neighbours:
    """Busy-loop processes, one per core: started stopped (SIGSTOP), run while resumed
    (SIGCONT), killed when the ``with`` ends."""

    def __init__(self, count=None, pids=None):
        self.count = count
        self.pids = list(pids or [])
        self.procs = []

    def __enter__(self):
        for _ in range(self.count):
            # each in a session of its own, as another user's job is: with autogroups the
            # scheduler shares the cores between sessions first
            p = subprocess.Popen([sys.executable, "-c", BURNER], start_new_session=True)
            os.kill(p.pid, signal.SIGSTOP)
            self.procs.append(p)
        self.pids = [p.pid for p in self.procs]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []

    def resume(self):
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)

    def pause(self):
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure(variants, rounds, warmup, samples, min_seconds, log=sys.stderr):
    results = {name: [] for name in variants}
    with Neighbours(cores()) as neighbours:
        for r, name in rotating_rounds(list(variants), rounds):
            threads, omp_env, mkldnn = VARIANTS[name]
            env = {k: v for k, v in os.environ.items() if k not in OMP_ENV}
            env.update(omp_env)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(threads),
                   str(int(mkldnn)), str(warmup), str(samples), str(min_seconds),
                   ",".join(map(str, neighbours.pids))]
            try:
                # a session of its own: its priority (the idle load) is its alone
                done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                      start_new_session=True)
            finally:
                neighbours.pause()  # a child that failed while they ran
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or [""]
                raise SystemExit(f"error: {name} failed: {tail[0]}")
            m = json.loads(done.stdout.strip().splitlines()[-1])
            results[name].append(m)
            for load in m["ms_per_step"]:
                ms = ", ".join(f"{k} {v:.1f}" for k, v in m["ms_per_step"][load].items())
                print(f"  round {r + 1}/{rounds}: {name}, {load}: {ms} ms/step; "
                      f"{m['cores_used'][load]:.2f} cores used, machine idle "
                      f"{_pct(m['machine_idle'][load])}, load {m['loadavg_1min'][load]:.1f}",
                      file=log, flush=True)
    return summarise(variants, results)


def _pct(share):
    return "n/a" if share is None else f"{share * 100:.0f} %"


def _num(value, digits=1):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _spread(values):
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def summarise(variants, results):
    """Rows per (variant, conv mode): median ms per step alone and busy over the rounds, their
    spread, busy over alone; and per (variant, load) what the machine was doing meanwhile."""
    rows = []
    for name in variants:
        threads, omp_env, mkldnn = VARIANTS[name]
        for mode in MODES:
            row = {"variant": name, "threads": threads,
                   "omp_wait_policy": omp_env.get("OMP_WAIT_POLICY"),
                   "mkldnn": mkldnn, "conv": mode}
            for load in LOADS:
                ms = [m["ms_per_step"][load][mode] for m in results[name]
                      if load in m["ms_per_step"]]
                row[f"ms_{load}"] = statistics.median(ms) if ms else None
                row[f"spread_{load}"] = _spread(ms) if ms else None
                row[f"images_per_s_{load}"] = (BATCH * 1e3 / row[f"ms_{load}"] if ms
                                               else None)
            row["busy_over_alone"] = row["ms_busy"] / row["ms_alone"]
            row["busy_over_idle"] = row["ms_busy"] / row["ms_idle"] if row["ms_idle"] else None
            rows.append(row)
    context = []
    for name in variants:
        ms = results[name]
        for load in [v for v in LOADS if v in ms[0]["ms_per_step"]]:
            idle = [m["machine_idle"][load] for m in ms if m["machine_idle"][load] is not None]
            context.append({"variant": name, "load": load,
                            "cores_used": statistics.median(m["cores_used"][load] for m in ms),
                            "machine_idle": statistics.median(idle) if idle else None,
                            "loadavg_1min": statistics.median(m["loadavg_1min"][load]
                                                              for m in ms),
                            "torch_threads": ms[0]["torch_threads"],
                            "omp_wait_policy": ms[0]["omp_wait_policy"],
                            "mkldnn": ms[0]["mkldnn"]})
    return rows, context


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(DEFAULT_VARIANTS), metavar="VARIANT",
                        help="of: " + "; ".join(VARIANTS))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "busy-cpu.json"))
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        threads, mkldnn, warmup, samples, min_seconds, pids = args.child
        neighbours = Neighbours(pids=[int(p) for p in pids.split(",") if p])
        print(json.dumps(child(int(threads), bool(int(mkldnn)), int(warmup), int(samples),
                               float(min_seconds), neighbours)))
        return
    variants, rounds, warmup, samples, min_seconds = (
        (QUICK_VARIANTS, 1, 1, 1, 0.0) if args.quick
        else (tuple(args.variants), args.rounds, 2, 2, 0.3))
    import torch

    print(f"octconv-exp busy-machine benchmark — cpu ({platform.machine()}, {cores()} cores) — "
          f"torch {torch.__version__} — seed CNN training steps, batch {BATCH}, channels_last, "
          f"alpha 0.5 — idle (real-time), alone, and beside {cores()} busy-loop processes "
          f"— one process each, "
          f"median of {rounds} interleaved rounds; load average now "
          f"{os.getloadavg()[0]:.1f}\n")
    rows, context = measure(variants, rounds, warmup, samples, min_seconds)
    print("| variant | conv | ms/step idle | ms/step alone | ms/step busy | busy / alone "
          "| busy / idle | spread idle / alone / busy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        spreads = " / ".join(_pct(r[f"spread_{load}"]) for load in LOADS)
        print(f"| {r['variant']} | {r['conv']} | {_num(r['ms_idle'])} | {r['ms_alone']:.1f} | "
              f"{r['ms_busy']:.1f} | {r['busy_over_alone']:.2f} | "
              f"{_num(r['busy_over_idle'], 2)} | {spreads} |")
    print("\n| variant | load | cores used | machine idle | load average |")
    print("| --- | --- | --- | --- | --- |")
    for c in context:
        print(f"| {c['variant']} | {c['load']} | {c['cores_used']:.2f} | "
              f"{_pct(c['machine_idle'])} | {c['loadavg_1min']:.1f} |", flush=True)
    write_results(args.out, {"device": "cpu", "torch": torch.__version__, "cores": cores(),
                             "batch": BATCH, "rounds": rounds, "quick": args.quick,
                             "rows": rows, "context": context})


if __name__ == "__main__":
    main()
