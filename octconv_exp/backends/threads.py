"""CPU threads of a run: how torch's OpenMP threads wait; the thread settings metrics.json records.

torch's CPU kernels run on OpenMP threads (GNU libgomp in the PyPI wheels). Between parallel
regions, and at the barrier that ends each, an idle thread waits. libgomp's default wait (no
``OMP_WAIT_POLICY``) spins first, up to 300,000 iterations (``GOMP_SPINCOUNT``), before it
sleeps; it shortens the spin only when there are more threads than cores the process may run on,
which other processes' load does not change. On a machine whose cores other processes keep busy
a spinning thread takes a core's time slice from the thread it waits for, at every barrier; the
octave conv mode runs many small ops, a barrier each. ``OMP_WAIT_POLICY=PASSIVE`` makes waiting
threads sleep at once. Measured (bench/bench_busy.py, docs/performance.md "On a busy machine"):
PASSIVE keeps the training step's time beside busy neighbours near threads=1's, and costs nothing
measurable when the machine is idle, so a run sets it when the user has not
(:func:`wait_policy_decision`, applied by run.py before torch is imported: the runtime reads its
environment once, when it is loaded).

No torch import here: run.py calls this before torch is loaded.
"""
import os
import sys

#: the environment variables that decide how the OpenMP/MKL threads run, as metrics.json lists them
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
#: the wait policy a run sets when the user set none
DEFAULT_WAIT_POLICY = "PASSIVE"

#: What run.py decided about OMP_WAIT_POLICY in this process (None: it did not decide: a run
#: started some other way, which then records the environment as it finds it).
_wait_policy = {"decision": None}


def wait_policy_decision(environ, torch_loaded):
    """(the OMP_WAIT_POLICY to set, or None to leave the environment alone; why)."""
    for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if environ.get(key):
            return None, f"{key}={environ[key]}: from the environment"
    if torch_loaded:
        return None, ("unset: torch was loaded before run.py could set it (OpenMP reads its "
                      "environment once); libgomp's default: spin, then sleep")
    return DEFAULT_WAIT_POLICY, (f"{DEFAULT_WAIT_POLICY}: set by run.py (the environment had "
                                 "none): waiting threads sleep instead of spinning")


def apply_wait_policy(environ=None, torch_loaded=None):
    """Set OMP_WAIT_POLICY for this process (and the processes it starts) if the environment
    has none; returns the decision's text, which metrics.json records."""
    environ = os.environ if environ is None else environ
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    value, why = wait_policy_decision(environ, torch_loaded)
    if value is not None:
        environ["OMP_WAIT_POLICY"] = value
    _wait_policy["decision"] = why
    return why


def threads_decision(config_threads, requested):
    """Why the run has the torch thread count it has: ``config_threads`` is the config's
    ``threads``, ``requested`` what the launcher asked for (runner.set_threads' argument)."""
    if config_threads is not None:
        return f"threads={int(config_threads)}: the config's"
    if requested is not None:
        return f"{int(requested)}: this job's share of the cores under a parallel launcher"
    return "torch's default (threads=null)"


def thread_record(config_threads, requested, environ=None):
    """metrics.json's ``threads``: torch's intra- and inter-op thread counts, the thread
    environment as this process saw it, and the decisions behind them."""
    import torch

    environ = os.environ if environ is None else environ
    return {"torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "env": {key: environ.get(key) for key in THREAD_ENV},
            "threads_decision": threads_decision(config_threads, requested),
            "wait_policy_decision": _wait_policy["decision"] or _as_found(environ)}


def _as_found(environ):
    """The wait policy of a process that run.py did not start (a test, a notebook)."""
    value, why = wait_policy_decision(environ, torch_loaded=True)
    return why
