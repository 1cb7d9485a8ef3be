"""CPU threads of a run: how torch's OpenMP threads wait; the thread settings metrics.json records.

torch's CPU kernels run on OpenMP threads (GNU libgomp in the PyPI wheels). At the barrier that
ends each parallel region a thread that has finished waits for the others. libgomp's default
wait (no ``OMP_WAIT_POLICY``) spins first, up to 300,000 iterations (``GOMP_SPINCOUNT``), then
sleeps; it shortens the spin only when a team has more threads than the process has cores,
which other processes' load does not change. On a machine whose cores other processes keep busy
the thread waited for is often not running, and the spinning ones burn the time slices it needs;
the seed CNN's octave mode runs many small ops, a barrier each. ``OMP_WAIT_POLICY=PASSIVE``
makes waiting threads sleep at once, which costs a wake-up per region instead.

Measured (bench/bench_busy.py, docs/performance.md "On a busy machine"): beside other
processes PASSIVE made a 2-thread training step 4-7x faster than the default wait; on an idle
machine it measured as fast in one round and up to 1.5x slower in another. So run.py sets
PASSIVE only where the machine is busy when the run starts (:func:`wait_policy_decision`:
a 1-minute load average of at least :data:`BUSY_LOAD`), before torch is imported (the runtime
reads its environment once, when it loads), and never over the user's own setting.

No torch import here: run.py calls this before torch is loaded.
"""
import os
import sys

#: the environment variables that decide how the OpenMP/MKL threads run, as metrics.json lists them
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
#: the wait policy a run sets on a busy machine when the user set none
BUSY_WAIT_POLICY = "PASSIVE"
#: a 1-minute load average from which the machine counts as busy: one core's worth of other
#: runnable threads, so that a team of a thread per core has one of them off its core
BUSY_LOAD = 1.0

#: What run.py decided about OMP_WAIT_POLICY in this process (None: it did not decide: a run
#: started some other way, which then records the environment as it finds it), and the load
#: it decided by, which also sets the thread count of threads=null (:func:`resolve_threads`).
_wait_policy = {"decision": None, "load": None, "cores": None}


def wait_policy_decision(environ, torch_loaded, load, cores):
    """(the OMP_WAIT_POLICY to set, or None to leave the environment alone; why). ``load``:
    the 1-minute load average when the run starts (None: unknown), ``cores``: the cores the
    process may run on."""
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if environ.get(key):
            return None, f"{key}={environ[key]}: from the environment"
    if torch_loaded:
        return None, ("unset: torch was loaded before run.py could set it (OpenMP reads its "
                      "environment once); libgomp's default: spin, then sleep")
    if load is None or load < BUSY_LOAD:
        return None, (f"unset: libgomp's default (spin, then sleep): the machine was idle at the "
                      f"start (load average {_load(load)} < {BUSY_LOAD} on {cores} cores)")
    return BUSY_WAIT_POLICY, (f"{BUSY_WAIT_POLICY}: set by run.py: the machine was busy at the "
                              f"start (load average {_load(load)} >= {BUSY_LOAD} on {cores} "
                              "cores): waiting threads sleep instead of spinning")


def _load(load):
    return "unknown" if load is None else f"{load:.2f}"


def machine_load():
    """(1-minute load average or None, cores this process may run on)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return load, cores


def apply_wait_policy(environ=None, torch_loaded=None, load_and_cores=None):
    """Set OMP_WAIT_POLICY for this process (and the processes it starts) as
    :func:`wait_policy_decision` says; returns the decision's text, which metrics.json records."""
    environ = os.environ if environ is None else environ
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    load, cores = machine_load() if load_and_cores is None else load_and_cores
    value, why = wait_policy_decision(environ, torch_loaded, load, cores)
    if value is not None:
        environ["OMP_WAIT_POLICY"] = value
    _wait_policy.update(decision=why, load=load, cores=cores)
    return why


def busy_machine_threads(load, cores):
    """The torch threads of threads=null: None (torch's default, a thread per core) where the
    machine was idle at the start; on a busy one the cores its load leaves free, at least 1
    (measured: on the busy 2-core machine 1 thread took 0.3-0.5x the step time of 2 sleeping
    threads, and as long as 2 spinning ones on it idle)."""
    if load is None or load < BUSY_LOAD:
        return None
    return max(1, min(cores, int(cores - load + 0.5)))


def resolve_threads(config_threads, requested, environ=None):
    """(torch threads to set, None for torch's default; why). ``config_threads`` is the
    config's ``threads``, ``requested`` what the launcher asked for (cli.launcher_threads).
    An OMP_NUM_THREADS in the environment is the user's thread count: torch's default
    follows it."""
    environ = os.environ if environ is None else environ
    if config_threads is not None:
        return int(config_threads), f"threads={int(config_threads)}: the config's"
    if requested is not None:
        return int(requested), (f"{int(requested)}: this job's share of the cores under a "
                                "parallel launcher")
    if environ.get("OMP_NUM_THREADS"):
        return None, f"torch's default (threads=null; OMP_NUM_THREADS={environ['OMP_NUM_THREADS']})"
    load, cores = _wait_policy["load"], _wait_policy["cores"]
    busy = busy_machine_threads(load, cores)
    if busy is not None:
        return busy, (f"{busy}: threads=null on a busy machine: the cores left free by the load "
                      f"at the start (load average {_load(load)} on {cores} cores)")
    return None, "torch's default (threads=null)"


def thread_record(threads_decision, environ=None):
    """metrics.json's ``threads``: torch's intra- and inter-op thread counts, the thread
    environment as this process saw it, and the decisions behind them (``threads_decision``:
    :func:`resolve_threads`' why)."""
    import torch

    environ = os.environ if environ is None else environ
    return {"torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "env": {key: environ.get(key) for key in THREAD_ENV},
            "threads_decision": threads_decision,
            "wait_policy_decision": _wait_policy["decision"] or _as_found(environ)}


def _as_found(environ):
    """The wait policy of a process that run.py did not start (a test, a notebook)."""
    return wait_policy_decision(environ, True, None, None)[1]
