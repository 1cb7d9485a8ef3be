"""A run's end on the command line: run.py's task function (:func:`run_task`) runs one
:class:`~octconv_exp.training.runner.RunLifecycle` and turns its ending (completed,
interrupted, diverged, failed) into the record, the one line and the exit status; in a
multirun, a job's failure is recorded and the sweep goes on. What happens before Hydra starts
is :mod:`.preflight`.
"""
import logging
import os
import signal
import sys
import threading

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from ..backends.distributed import launched_rank
from ..records.objectives import objective_values
from ..sweeps.gpus import GpuClaim
from ..training.resume import explicit_keys
from ..training.stopping import PROCESS, StopRequest, marker_signal
from .preflight import exit_with, fail

log = logging.getLogger("octconv_exp")


def is_multirun():
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def launcher_threads(cfg):
    """torch threads per job: the config's ``threads``, else the job's share of the cores
    under a parallel launcher (joblib: cores / n_jobs; submitit: its cpus_per_task)."""
    if cfg.get("threads") is not None:
        return int(cfg.threads)
    try:
        launcher = HydraConfig.get().launcher
    except ValueError:
        return None
    target = str(launcher.get("_target_", ""))
    cores = os.cpu_count() or 1
    if target.endswith("JoblibLauncher"):
        n_jobs = launcher.get("n_jobs", -1)
        n_jobs = cores if n_jobs is None or n_jobs < 1 else n_jobs
        return max(1, cores // min(n_jobs, cores))
    if "submitit" in target and launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    return None


def run_task(cfg, recorded_overrides=()):
    """The body of run.py's task function: returns the test accuracy.
    ``recorded_overrides``: those of the command line preflight took from the run's record.

    A single run ends a failed run with one line and exit status 2. In a multirun, a failed
    or diverged job is recorded in its metrics.json and the sweep goes on; the sweep report
    (octconv_exp.reports.report.SweepReport) then exits non-zero, naming the failed jobs. A run holds
    its dir's lock while it runs; a refused resume or evaluation leaves the dir's record
    (metrics.json, epochs.csv, .hydra/) as it was.
    """
    from ..training.runner import (  # deferred: loads torch; imported before torch at start-up
        Outcome,
        RunLifecycle,
    )

    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    multirun = is_multirun()
    in_worker = multirun and parallel_launcher(hydra_cfg)
    if in_worker and threading.current_thread() is threading.main_thread():
        # A joblib worker gets the terminal's Ctrl-C too: between jobs it only takes note.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, PROCESS.sweep_stop.note)
    # Jobs running side by side on this machine each take a GPU of their own (when it has
    # several); the lock dies with the job.
    gpu_claim = (GpuClaim(hydra_cfg.sweep.dir, hydra_cfg.job.num) if in_worker else None)
    lifecycle = RunLifecycle(cfg, output_dir, threads=launcher_threads(cfg), sweep_job=multirun,
                             explicit=explicit_keys(hydra_cfg.overrides.task,
                                                    recorded_overrides),
                             gpu_claim=gpu_claim, attempt_subdir=hydra_cfg.output_subdir)
    signalled = PROCESS.sweep_stop.signal if multirun else None
    if signalled is None and in_worker:
        # The sweep's own process was signalled (kill PID), not this one.
        signalled = marker_signal(str(hydra_cfg.sweep.dir))
    if signalled is not None:  # a job due after the sweep was interrupted
        return report_ending(lifecycle.not_started(signalled), cfg, output_dir, hydra_cfg,
                             multirun)
    # SIGINT/SIGTERM from start-up to the last output written.
    with StopRequest(PROCESS.sweep_stop) as stop:
        if in_worker:
            stop.sweep_dir = str(hydra_cfg.sweep.dir)
        ending = lifecycle.run(stop)
        if ending.outcome is not Outcome.COMPLETED:  # its line is said while still "closing"
            return report_ending(ending, lifecycle.run_record.cfg, output_dir, hydra_cfg,
                                 multirun)
    return report_ending(ending, lifecycle.run_record.cfg, output_dir, hydra_cfg, multirun)


def report_ending(ending, cfg, output_dir, hydra_cfg, multirun):
    """What run.py's task function does with a run's :class:`~octconv_exp.training.runner.Ending`:
    returns the sweeper's value for a completed run; otherwise one line (a sweep's job:
    naming the job, and the sweep goes on with None) and, for a single run, its exit status.
    A programming error in a single run is raised again with its traceback."""
    from ..training.runner import Outcome  # deferred: loads torch; imported before torch at start-up

    if ending.outcome is Outcome.COMPLETED:
        log.info("Outputs in %s", output_dir)
        return task_value(cfg, ending.metrics, hydra_cfg)
    if ending.bug is not None:
        raise ending.bug
    if multirun:  # the jobs still to come are recorded as not started; the report follows
        sweep_dir = str(hydra_cfg.sweep.dir)
        sys.stderr.write(f"error: {os.path.relpath(output_dir, sweep_dir)}: {ending.message}\n")
        return None
    rank = launched_rank()
    if ending.outcome is Outcome.INTERRUPTED:
        if rank != 0:  # data-parallel: rank 0 says it, for all of them
            exit_with(ending.exit_code)
        fail(ending.message, ending.exit_code)  # a single run, or a sequential sweep: stop it
    fail(f"rank {rank}: {ending.message}" if rank else ending.message, ending.exit_code)


def task_value(cfg, metrics, hydra_cfg):
    """What run.py returns to the sweeper: under a search (search=optuna), the objectives of
    ``search.objectives`` (None for a run without them: a failed trial); otherwise the test
    accuracy."""
    if "optuna" not in str(hydra_cfg.sweeper.get("_target_", "")).lower():
        return metrics.get("test_accuracy")

    objectives = OmegaConf.select(cfg, "search.objectives", default=None) or ["accuracy"]
    return objective_values(metrics, list(objectives))


def parallel_launcher(hydra_cfg):
    """Does this sweep run its jobs in worker processes of this machine (joblib)?"""
    return str(hydra_cfg.launcher.get("_target_", "")).endswith("JoblibLauncher")
