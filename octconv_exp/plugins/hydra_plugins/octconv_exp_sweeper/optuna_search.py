"""The Hydra Optuna sweeper (hydra-optuna-sweeper 1.3.0), with what a search needs to be
stopped and continued, and its trials kept apart on disk.

Selected with ``hydra/sweeper=octconv_exp_optuna`` (``experiment=alpha_search`` does it).
Everything is the plugin's (samplers, ``hydra.sweeper.params`` search space, ``n_jobs``
batches, the study in ``hydra.sweeper.storage``), except:

- **Continuing**: ``hydra.sweeper.n_trials`` is the study's total. Run again with the same
  sweep dir (and so the same SQLite study), the sweep runs only the trials still missing;
  trials a killed sweep left RUNNING are recorded FAIL and their parameters are tried again
  first (``Study.enqueue_trial``).
- **One dir per trial**: trial N runs in ``<sweep dir>/trial=N`` with ``hydra.job.num`` N, so
  a continued search never reuses a dir, and two trials that sample the same values do not
  share one.
- The sweep dir exists before the study is created in it (the default storage is
  ``sqlite:///<sweep dir>/optuna.db``).

A trial's value is what ``run.py`` returns: the objectives of ``search.objectives`` (see
``octconv_exp.search``); a failed or diverged job returns None, which the plugin records as a
FAIL trial (``hydra.sweeper.max_failure_rate``: 1.0 in the preset, so the search goes on).
"""
import logging
import os

log = logging.getLogger(__name__)

try:  # the plugin is optional: without it this sweeper is simply not offered. (Optuna itself
    # is imported when a search starts: Hydra imports every plugin module at start-up.)
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - exercised where the plugin is not installed
    OptunaSweeper = None


class _TrialNamedLauncher:
    """The launcher, with each job placed in ``trial=<number>`` and numbered so (Optuna
    numbers a study's trials 0, 1, ... in the order they are asked, and this sweeper asks
    them one batch at a time)."""

    def __init__(self, launcher, first_number):
        self.launcher = launcher
        self.next_number = first_number

    def launch(self, job_overrides, initial_job_idx):
        first = self.next_number
        named = [list(job) + [f"hydra.sweep.subdir='trial={first + i}'"]
                 for i, job in enumerate(job_overrides)]
        self.next_number += len(named)
        return self.launcher.launch(named, initial_job_idx=first)

    def __getattr__(self, name):
        return getattr(self.launcher, name)


FINISHED = ("COMPLETE", "FAIL", "PRUNED")


if OptunaSweeper is not None:

    class OptunaSearchSweeper(OptunaSweeper):
        def setup(self, **kwargs):
            from octconv_exp.search import plain_optuna_logs

            plain_optuna_logs()  # before the study is created (Optuna's first log line)
            return super().setup(**kwargs)

        def sweep(self, arguments):
            impl = self.sweeper
            os.makedirs(str(impl.config.hydra.sweep.dir), exist_ok=True)
            target = int(impl.n_trials)
            done, first = self._continue_study(impl)
            impl.n_trials = max(0, target - done)
            if done:
                log.info("Study %s holds %d finished trial(s) of %d: running %d more",
                         impl.study_name, done, target, impl.n_trials)
            impl.launcher = _TrialNamedLauncher(impl.launcher, first)
            if impl.n_trials == 0:
                return None  # the report still runs (the multirun-end callback)
            return impl.sweep(arguments)

        @staticmethod
        def _continue_study(impl):
            """``(finished trials, number of the next trial)`` of the study this sweep
            continues (0, 0 for a new one); trials left RUNNING by a sweep that was killed
            are recorded FAIL and their parameters queued to run first."""
            import optuna

            if impl.storage is None:
                return 0, 0
            try:
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
            except KeyError:  # no such study yet
                return 0, 0
            stale = [t for t in study.trials if t.state.name == "RUNNING"]
            for trial in stale:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                study.enqueue_trial(dict(trial.params))
                log.warning("Trial %d was left running by an interrupted sweep: recorded as "
                            "failed, its parameters %s queued again", trial.number, trial.params)
            trials = study.trials
            # The interrupted trials do not count: their parameters run again.
            done = sum(1 for t in trials if t.state.name in FINISHED) - len(stale)
            # Optuna asks the queued (WAITING) trials first, in their order, then new ones.
            waiting = [t.number for t in trials if t.state.name == "WAITING"]
            return done, min(waiting) if waiting else len(trials)
