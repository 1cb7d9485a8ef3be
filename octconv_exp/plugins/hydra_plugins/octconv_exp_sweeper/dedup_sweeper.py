"""Hydra's basic sweeper, minus the jobs that would retrain the same vanilla model, and with
job directories named by what the sweep varies.

Vanilla convolutions ignore alpha, so `-m conv=vanilla,octave alpha=0.25,0.5` trains vanilla
once (without its alpha override) and octave twice. Each job gets
`hydra.sweep.subdir=<varying overrides>/seed=<seed>` (octconv_exp.sweeps.sweep.job_subdirs).
Before the first job is launched, the jobs it will run are written into the sweep dir
(`jobs.yaml`, octconv_exp.sweeps.sweep.write_plan), so that the report counts the jobs that never
started. Everything else is BasicSweeper's.
"""
import logging
import os
import re
import shlex
import sys
import warnings

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from octconv_exp.errors import UserError
from octconv_exp.sweeps.sweep import dedupe_vanilla, job_subdirs, plan_entry, write_plan

log = logging.getLogger(__name__)


def check_resume(cfg, job, run_dir):
    """resume=true: the job's checkpoint must take this job's overrides (the check each job
    makes, all of them before the first starts: otherwise every job is refused, alone)."""
    from omegaconf import OmegaConf, open_dict

    from octconv_exp.training.resume import config_for_resume, explicit_keys
    from octconv_exp.training.runner import find_resume_checkpoint

    if not OmegaConf.select(cfg, "resume", default=False):
        return
    task = cfg.copy()
    with open_dict(task):
        task.pop("hydra", None)
    if task.get("ckpt_path") is None and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return  # a job that never ran: it starts afresh
    try:
        found = find_resume_checkpoint(task, run_dir, fresh_if_no_checkpoint=True)
    except UserError:  # an unreadable checkpoint: that job says so, the others run
        return
    if found is not None:
        config_for_resume(task, found.state, explicit_keys(job), found.path)


def worker_died(exc):
    """Is ``exc`` joblib's (loky's) word that a worker process died under a job?"""
    return any(c.__name__ in ("TerminatedWorkerError", "BrokenProcessPool")
               for c in type(exc).__mro__)


def subdir_of(job):
    for text in job:
        if text.startswith("hydra.sweep.subdir="):
            return text.partition("=")[2].strip("'\"")
    return None


def _died_jobs(sweep_dir, subdirs):
    """The jobs of the batch a dead worker ended: their run dir still holds the lock of a
    process that is gone (a job that ended released it)."""
    import json

    from octconv_exp.training.rundir import LOCK_FILE

    died = []
    for subdir in subdirs:
        if subdir is None:
            continue
        try:
            with open(os.path.join(sweep_dir, subdir, LOCK_FILE)) as f:
                pid = int(json.load(f)["pid"])
            os.kill(pid, 0)
        except ProcessLookupError:
            died.append(subdir)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no lock (ended, or never started), or one we cannot read
    return died


def resume_command(sweep_dir):
    """The command that continues this sweep: its own, with resume=true and its sweep dir."""
    from octconv_exp.cli.preflight import _sets
    from octconv_exp.training.resume import hydra_quoted

    args = [a for a in sys.argv[1:] if not a.startswith("hydra.output_subdir=.hydra/attempts/")]
    overrides = [a for a in args if not a.startswith("-")]
    try:
        resumed = _sets(overrides, "resume", True)
    except Exception:  # noqa: BLE001 - it parsed once already; be safe
        resumed = False
    if not resumed:
        args.append("resume=true")
    if not any(a.lstrip("+").startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={hydra_quoted(sweep_dir)}")
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("run.py") else "run.py"
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in args])


#: Where a relaunched loky resource tracker writes, in the sweep dir (see quiet_tracker_relaunch).
TRACKER_LOG = "joblib_resource_tracker.log"


def quiet_tracker_relaunch(sweep_dir):
    """loky's resource tracker (a helper process of joblib's; no job runs in it) that dies is
    relaunched by loky, and the new one prints a traceback for every temporary file or
    semaphore it was never told of (dozens of lines) while the jobs go on unharmed. Say so in
    one line and send the new tracker's output to the sweep dir instead."""
    try:
        from joblib.externals.loky.backend import resource_tracker
    except ImportError:  # no joblib launcher installed
        return
    tracker = getattr(resource_tracker, "ResourceTracker", None)
    if tracker is None or getattr(tracker, "_octconv_quiet", False):
        return
    warnings.filterwarnings("ignore", message="resource_tracker: process died unexpectedly")

    def relaunched(launch, self, *args):
        log_path = os.path.join(sweep_dir, TRACKER_LOG)
        sys.stderr.write(f"warning: joblib's resource tracker process died and was restarted; "
                         f"the jobs go on; its messages go to {log_path}\n")
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 2)  # the tracker inherits this process's stderr as it starts
            os.close(fd)
            return launch(self, *args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    if hasattr(tracker, "_launch"):  # loky of joblib >= 1.5: launches in _launch
        launch = tracker._launch

        def _launch(self):
            if not getattr(self, "_octconv_launched", False):
                self._octconv_launched = True
                return launch(self)
            return relaunched(launch, self)

        tracker._launch = _launch
    elif hasattr(tracker, "_check_alive"):  # older loky: inside ensure_running
        ensure_running = tracker.ensure_running

        def _ensure_running(self):
            if getattr(self, "_fd", None) is not None and not self._check_alive():
                return relaunched(ensure_running, self)
            return ensure_running(self)

        tracker.ensure_running = _ensure_running
    tracker._octconv_quiet = True


def dead_worker_line(exc, sweep_dir, running):
    """One line for a sweep whose joblib worker died: which job's, what the report holds,
    how to continue. loky then kills the batch's other workers too (SIGKILL), so every job of
    the batch still running died with it; their last epoch's checkpoints are kept."""
    from octconv_exp.reports.report import build_report, readable

    codes = re.findall(r"\{([^}]*)\}", str(exc))
    how = f" ({codes[-1]})" if codes else ""
    died = _died_jobs(sweep_dir, running)
    if len(died) == 1:
        which = f"{died[0]}: its joblib worker process died{how}"
    elif died:
        which = (f"the joblib workers of {', '.join(died)} died{how} (when one worker dies, "
                 "joblib kills the others)")
    else:
        which = f"a joblib worker process died{how}"
    try:
        build_report(sweep_dir)
        report = f"the report of the jobs with records is in {os.path.join(sweep_dir, 'summary.md')}"
    except Exception as report_exc:  # noqa: BLE001 - the line says so; the records stay
        report = f"no report ({' '.join(str(report_exc).split())[:200]})"
    return readable(f"{which}; the sweep stopped, {report}; continue it (finished jobs are kept, "
                    f"the others go on from their checkpoints) with: {resume_command(sweep_dir)}")


class DedupSweeper(BasicSweeper):
    _plan = None

    def sweep(self, arguments):
        """One sweep process per sweep dir; a resume that would change a job is refused
        before anything is written (multirun.yaml, jobs.yaml)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from octconv_exp.cli.outcome import fail
        from octconv_exp.training.rundir import lock_sweep_dir
        from octconv_exp.training.stopping import PROCESS

        sweep_dir = str(self.config.hydra.sweep.dir)
        try:
            lock_sweep_dir(sweep_dir)
            parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
            parsed = parser.parse_overrides(self._parse_config() + list(arguments))
            self.overrides = self.split_arguments(parsed, self.max_batch_size)
            self._plan = self._make_plan()
            PROCESS.sweep_stop.start(sweep_dir)
        except UserError as exc:
            fail(str(exc))
        # A worker that dies (kill -9, the OOM killer) leaves the multiprocessing resource
        # tracker a semaphore to clean up, which it reports in two lines of its own.
        sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
        warnings.filterwarnings("ignore", category=UserWarning,
                                module="multiprocessing.resource_tracker")
        quiet_tracker_relaunch(sweep_dir)
        try:
            return super().sweep(arguments)
        except Exception as exc:  # noqa: BLE001 - only a dead worker is handled here
            if not worker_died(exc):
                raise
            running = self._plan[self.batch_index - 1] if self._plan else []
            fail(dead_worker_line(exc, sweep_dir, [subdir_of(job) for job in running]),
                 code=1)

    def _compose(self, job):
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(job))

    def _make_plan(self):
        """All batches at once: the de-duplication and the names look across the sweep."""
        batches = [list(batch) for batch in self.overrides]
        jobs = [job for batch in batches for job in batch]
        composed = {}

        def config_of(job):
            key = tuple(job)
            if key not in composed:
                composed[key] = self._compose(job)
            return composed[key]

        kept, dropped = dedupe_vanilla(jobs, lambda job: config_of(job).conv.mode)
        if dropped:
            log.info("Vanilla ignores alpha: %d duplicate vanilla job(s) not launched", dropped)
        subdirs = job_subdirs(kept, lambda job: config_of(job).seed)
        named = [job + [f"hydra.sweep.subdir='{subdir}'"] for job, subdir in zip(kept, subdirs)]
        for job, subdir in zip(kept, subdirs):
            check_resume(config_of(job), job, os.path.join(str(self.config.hydra.sweep.dir),
                                                           subdir))
        self._write_plan([plan_entry(subdir, job, config_of(job))
                          for job, subdir in zip(kept, subdirs)])
        size = max(len(batch) for batch in batches) if batches else 1
        return [named[i:i + size] for i in range(0, len(named), size)] or [[]]

    def _write_plan(self, entries):
        sweep_dir = str(self.config.hydra.sweep.dir)
        try:
            write_plan(sweep_dir, entries)
        except (OSError, UserError) as exc:  # the jobs will meet the same disk; let them say
            log.warning("Could not write the job plan into %s (%s): the report will not count "
                        "jobs that never start", sweep_dir, exc)

    def get_job_batch(self):
        if self._plan is None:
            self._plan = self._make_plan()
        self.batch_index += 1
        return self._plan[self.batch_index - 1]

    def is_done(self):
        if self._plan is None:
            return super().is_done()
        return self.batch_index >= len(self._plan)
