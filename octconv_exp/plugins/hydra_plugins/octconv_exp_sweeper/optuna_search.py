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
- **Nothing is trained twice**: a trial whose overrides (sampled and fixed) are those of a
  COMPLETE trial is told that trial's values instead of being launched (no ``trial=N`` dir;
  system attribute ``octconv_exp:same_as`` names the trial it repeats); a continued study's
  seeded sampler is seeded anew (seed + trials finished), so that it does not propose the
  first run's parameters again; ``optimization_results.yaml`` lists each front point once.

A trial's value is what ``run.py`` returns: the objectives of ``search.objectives`` (see
``octconv_exp.search``); a failed or diverged job returns None, which the plugin records as a
FAIL trial (``hydra.sweeper.max_failure_rate``: 1.0 in the preset, so the search goes on).
"""
import functools
import logging
import os

from octconv_exp.search import trial_key, trial_overrides, unique_solutions

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
        self.trials = []  # the batch being launched, as Optuna asked them (their study)

    def launch(self, job_overrides, initial_job_idx):
        first = self.next_number
        jobs = [list(job) for job in job_overrides]
        self.next_number += len(jobs)
        known = self._completed()
        returns, launched_as = [None] * len(jobs), {}
        for i, job in enumerate(jobs):
            key = trial_key(job)
            if key in known:  # trained already: the study is told what it gave
                number, values = known[key]
                returns[i] = _told(job, values)
                self._mark(i, number)
                log.info("Trial %d has the overrides of trial %d: told its values %s, not "
                         "trained again", first + i, number, values)
            elif key in launched_as:  # twice in one batch: trained once
                self._mark(i, first + launched_as[key])
            else:
                launched_as[key] = i
        launch = [i for i, job in enumerate(jobs)
                  if returns[i] is None and launched_as.get(trial_key(job)) == i]
        # Consecutive jobs go out together (n_jobs at once), numbered as their trials.
        for start, end in _spans(launch):
            named = [jobs[j] + [f"hydra.sweep.subdir='trial={first + j}'"]
                     for j in range(start, end)]
            returns[start:end] = self.launcher.launch(named, initial_job_idx=first + start)
        return [ret if ret is not None else returns[launched_as[trial_key(job)]]
                for job, ret in zip(jobs, returns)]

    def _completed(self):
        """``{trial_key: (number, values)}`` of the study's COMPLETE trials."""
        if not self.trials:
            return {}
        study = self.trials[0].study
        known = {}
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "COMPLETE" and t.values is not None:
                known.setdefault(trial_key(trial_overrides(t.params, t.user_attrs)),
                                 (t.number, list(t.values)))
        return known

    def _mark(self, index, number):
        if index < len(self.trials) and hasattr(self.trials[index], "set_system_attr"):
            self.trials[index].set_system_attr("octconv_exp:same_as", number)

    def __getattr__(self, name):
        return getattr(self.launcher, name)


FINISHED = ("COMPLETE", "FAIL", "PRUNED")


def _spans(indices):
    """``[(start, end)]`` of the runs of consecutive numbers in the sorted ``indices``."""
    spans = []
    for i in indices:
        if spans and spans[-1][1] == i:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [tuple(span) for span in spans]


def _told(overrides, values):
    """The return of a job not launched: a trial repeating one already finished."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = values if len(values) > 1 else values[0]
    return ret


def _watch_trials(impl, launcher):
    """Let ``launcher`` see each batch's trials as the plugin configures them (it launches
    their overrides next)."""
    configure = impl._configure_trials

    def configure_and_keep(trials, *args, **kwargs):
        launcher.trials = list(trials)
        return configure(trials, *args, **kwargs)

    impl._configure_trials = configure_and_keep


def _reseed(impl, offset):
    """A continued study's sampler, seeded ``offset`` past its configured seed (a sampler
    without a seed, or a grid, is left as it is)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.select(impl.config, "hydra.sweeper.sampler")
    seed = node.get("seed") if node is not None else None
    if seed is None or isinstance(impl.sampler, functools.partial):
        return
    impl.sampler = instantiate(node, seed=int(seed) + offset)


def _unique_front(sweep_dir):
    """optimization_results.yaml with each Pareto point's parameters once."""
    import yaml

    from octconv_exp.outputs import write_text_atomic

    path = os.path.join(sweep_dir, "optimization_results.yaml")
    try:
        with open(path) as f:
            results = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return
    if isinstance(results, dict) and isinstance(results.get("solutions"), list):
        results["solutions"] = unique_solutions(results["solutions"])
        write_text_atomic(path, yaml.safe_dump(results, sort_keys=False))


if OptunaSweeper is not None:

    class OptunaSearchSweeper(OptunaSweeper):
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
            _watch_trials(impl, impl.launcher)
            if done:
                _reseed(impl, done)
            if impl.n_trials == 0:
                return None  # the report still runs (the multirun-end callback)
            result = impl.sweep(arguments)
            _unique_front(str(impl.config.hydra.sweep.dir))
            return result

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
