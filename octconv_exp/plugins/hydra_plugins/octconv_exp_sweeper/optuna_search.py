"""The Hydra Optuna sweeper (hydra-optuna-sweeper 1.3.0), with what a search needs to be
stopped and continued, and its trials kept apart on disk.

Selected with ``hydra/sweeper=octconv_exp_optuna`` (``experiment=alpha_search`` does it).
Everything is the plugin's (samplers, ``hydra.sweeper.params`` search space, ``n_jobs``
batches, the study in ``hydra.sweeper.storage``), except:

- **Continuing**: ``hydra.sweeper.n_trials`` is the study's total. Run again with the same
  sweep dir (and so the same SQLite study), the sweep runs only the trials still missing;
  trials an interrupted (SIGINT/SIGTERM) or killed sweep left RUNNING are not failures: they
  are asked again first, with their number, parameters and dir, and continue from their
  checkpoint where they have one (``resume=true`` is added to their job).
- **One search per sweep dir**: the sweep dir is locked while the search runs
  (``rundir.lock_sweep_dir``); ``study.yaml`` records the study it holds (name, storage,
  directions, search space) and another one is refused, as is a new study over ``trial=N``
  dirs that already hold records.
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
``octconv_exp.sweeps.search``); a failed or diverged job returns None, which the plugin records as a
FAIL trial (``hydra.sweeper.max_failure_rate``: 1.0 in the preset, so the search goes on).
"""
import functools
import json
import logging
import os

from octconv_exp.sweeps.search import trial_key, trial_overrides, unique_solutions

log = logging.getLogger(__name__)

try:  # the plugin is optional: without it this sweeper is simply not offered. (Optuna itself
    # is imported when a search starts: Hydra imports every plugin module at start-up.)
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - exercised where the plugin is not installed
    OptunaSweeper = None


STUDY_FILE = "study.yaml"
#: What makes a trial dir a record a new trial must not write over.
RECORD_NAMES = ("metrics.json", "epochs.csv", "model.pt", "checkpoints")


class SearchInterrupted(Exception):
    """SIGINT/SIGTERM stopped the search: no further trial is asked."""


def _trial_dir(sweep_dir, number):
    return os.path.join(sweep_dir, f"trial={number}")


def _holds_record(run_dir):
    return any(os.path.exists(os.path.join(run_dir, name)) for name in RECORD_NAMES)


def _recorded_trials(sweep_dir):
    """Numbers of the ``trial=N`` dirs of ``sweep_dir`` that hold a run's record."""
    numbers = []
    for name in os.listdir(sweep_dir):
        number = name[len("trial="):]
        if name.startswith("trial=") and number.isdigit() and \
                _holds_record(os.path.join(sweep_dir, name)):
            numbers.append(int(number))
    return sorted(numbers)


def _run_status(sweep_dir, number):
    try:
        with open(os.path.join(_trial_dir(sweep_dir, number), "metrics.json")) as f:
            return json.load(f).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _ranges(numbers):
    """trial=0..3, trial=7 for [0, 1, 2, 3, 7]."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(f"trial={start}" + (f"..{n}" if n != start else ""))
            start = None
    return ", ".join(spans)


def study_identity(impl, arguments, sweep_dir):
    """What makes a search the study a sweep dir holds: its name, its storage (an SQLite file
    inside the sweep dir relative to it, so the dir may move), its directions and its search
    space (``hydra.sweeper.params`` and the command line's sweep overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    storage = None if impl.storage is None else str(impl.storage)
    if storage and storage.startswith("sqlite:///"):
        path = os.path.abspath(storage[len("sqlite:///"):])
        inside = os.path.relpath(path, os.path.abspath(sweep_dir))
        storage = ("sqlite:///<sweep dir>/" + inside if not inside.startswith("..")
                   else "sqlite:///" + path)
    space = {str(k): "".join(str(v).split()) for k, v in (impl.params or {}).items()}
    for ov, text in zip(OverridesParser.create().parse_overrides(list(arguments)), arguments):
        if ov.is_sweep_override():
            space[ov.get_key_element()] = "".join(text.split("=", 1)[1].split())
    return {"study_name": str(impl.study_name), "storage": storage,
            "directions": [str(d) for d in impl._get_directions()],
            "search_space": dict(sorted(space.items()))}


def check_study(impl, arguments, sweep_dir):
    """Refuse a search whose study is not the one ``sweep_dir`` holds; returns the record to
    write (:func:`record_study`) when it holds none yet."""
    import yaml

    from octconv_exp.errors import UserError

    identity = study_identity(impl, arguments, sweep_dir)
    path = os.path.join(sweep_dir, STUDY_FILE)
    try:
        with open(path) as f:
            held = yaml.safe_load(f)
    except FileNotFoundError:
        held = None
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: unreadable ({' '.join(str(exc).split())[:200]}); it names the "
                        "study this sweep dir holds: restore it, or choose another "
                        "hydra.sweep.dir") from None
    if isinstance(held, dict):
        differ = [k for k in identity if k != "search_space" and held.get(k) != identity[k]]
        space = held.get("search_space") if isinstance(held.get("search_space"), dict) else {}
        differ += [f"search_space.{k}" for k in sorted(set(space) | set(identity["search_space"]))
                   if space.get(k) != identity["search_space"].get(k)]
        if differ:
            def shown(record, key):
                if key.startswith("search_space."):
                    found = (record.get("search_space") or {}).get(key.split(".", 1)[1])
                    return "(not searched)" if found is None else found
                return record.get(key)

            said = "; ".join(f"{k}: {shown(held, k)} there, {shown(identity, k)} here"
                             for k in differ)
            raise UserError(
                f"hydra.sweep.dir={sweep_dir} holds another search ({said}); a sweep dir "
                "belongs to one study: continue it with its own settings, or choose another "
                "hydra.sweep.dir")
        return None
    return identity


def unreadable_storage(storage, sweep_dir, exc):
    """One line for a study storage Optuna cannot open (a truncated or overwritten
    optuna.db): the file, what the database said, and the ways on."""
    from octconv_exp.cli.preflight import one_line

    reason = one_line(getattr(exc, "orig", None) or exc).split("[SQL:")[0].strip()[:200]
    storage = str(storage)
    where = (os.path.abspath(storage[len("sqlite:///"):]) if storage.startswith("sqlite:///")
             else storage)
    return (f"hydra.sweep.dir={sweep_dir}: the search's study storage {where} cannot be read "
            f"({reason}); restore it from a copy, or choose another hydra.sweep.dir (nothing "
            "in this one was changed)")


def record_study(sweep_dir, identity):
    import yaml

    from octconv_exp.records.outputs import write_text_atomic

    path = os.path.join(sweep_dir, STUDY_FILE)
    write_text_atomic(path, "# The Optuna study this sweep dir holds: a search into it must "
                            "be this one.\n" + yaml.safe_dump(identity, sort_keys=False))


class _TrialNamedLauncher:
    """The launcher, with each job placed in ``trial=<number>`` and numbered so: the numbers
    of the trials just asked (RUNNING in the study: this process alone runs trials of it,
    under the sweep dir's lock), else counted on from ``first_number``. A trial asked again
    whose dir holds a record continues it (``resume=true``). A sweep stopped by SIGINT or
    SIGTERM tells Optuna the trials of the batch that ended, leaves the interrupted ones
    RUNNING (asked again when the search continues) and raises :class:`SearchInterrupted`."""

    def __init__(self, launcher, first_number, impl=None, sweep_dir=None):
        self.launcher = launcher
        self.next_number = first_number
        self.impl = impl
        self.sweep_dir = sweep_dir
        self.trials = []  # the batch being launched, as Optuna asked them (their study)

    def _study(self):
        import optuna

        if self.impl is None or self.impl.storage is None:
            return None
        return optuna.load_study(study_name=self.impl.study_name, storage=self.impl.storage)

    def _numbers(self, count):
        study = self._study()
        if study is not None:
            running = sorted(t.number for t in study.trials if t.state.name == "RUNNING")
            if len(running) == count:
                return running
        return list(range(self.next_number, self.next_number + count))

    def launch(self, job_overrides, initial_job_idx):
        import time

        jobs = [list(job) for job in job_overrides]
        numbers = self._numbers(len(jobs))
        self.next_number = max(numbers, default=self.next_number - 1) + 1
        known = self._completed()
        returns, launched_as = [None] * len(jobs), {}
        for i, job in enumerate(jobs):
            key = trial_key(job)
            if key in known:  # trained already: the study is told what it gave
                number, values = known[key]
                returns[i] = _told(job, values)
                self._mark(i, number)
                log.info("Trial %d has the overrides of trial %d: told its values %s, not "
                         "trained again", numbers[i], number, values)
            elif key in launched_as:  # twice in one batch: trained once
                self._mark(i, numbers[launched_as[key]])
            else:
                launched_as[key] = i
        launch = [i for i, job in enumerate(jobs)
                  if returns[i] is None and launched_as.get(trial_key(job)) == i]
        # Jobs of consecutive trial numbers go out together (n_jobs at once), numbered so.
        for start, end in _spans(launch, numbers):
            named = []
            for j in range(start, end):
                job = jobs[j] + [f"hydra.sweep.subdir='trial={numbers[j]}'"]
                if self.sweep_dir and _holds_record(_trial_dir(self.sweep_dir, numbers[j])) \
                        and not any(o.lstrip("+").startswith("resume=") for o in job):
                    # An interrupted trial asked again: it continues (its record kept apart).
                    job += ["resume=true", "hydra.output_subdir=.hydra/attempts/"
                            f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"]
                named.append(job)
            returns[start:end] = self.launcher.launch(named, initial_job_idx=numbers[start])
        returns = [ret if ret is not None else returns[launched_as[trial_key(job)]]
                   for job, ret in zip(jobs, returns)]
        self._stop_if_interrupted(numbers, returns, told=set(range(len(jobs))) - set(launch))
        return returns

    def _completed(self):
        """``{trial_key: (number, values)}`` of the study's COMPLETE trials."""
        study = self.trials[0].study if self.trials else self._study()
        if study is None:
            return {}
        known = {}
        for t in study.get_trials(deepcopy=False):
            if t.state.name == "COMPLETE" and t.values is not None:
                known.setdefault(trial_key(trial_overrides(t.params, t.user_attrs)),
                                 (t.number, list(t.values)))
        return known

    def _mark(self, index, number):
        if index < len(self.trials) and hasattr(self.trials[index], "set_system_attr"):
            self.trials[index].set_system_attr("octconv_exp:same_as", number)

    def _stop_if_interrupted(self, numbers, returns, told=()):
        """``told``: indices of the batch answered from finished trials (not launched)."""
        import signal

        import optuna
        from hydra.core.utils import JobStatus

        from octconv_exp.training.stopping import PROCESS

        stopped_by = PROCESS.sweep_stop.signal
        status = {n: _run_status(self.sweep_dir, n) if self.sweep_dir else None for n in numbers}
        if stopped_by is None and "interrupted" not in status.values():
            return
        study = self._study()
        left = []
        for i, (number, ret) in enumerate(zip(numbers, returns)):
            value = ret._return_value if ret.status == JobStatus.COMPLETED else None
            if (status[number] == "completed" or i in told) and value is not None:
                values = list(value) if isinstance(value, (list, tuple)) else [value]
                if study is not None:
                    study.tell(number, values=[float(v) for v in values])
            elif status[number] in ("failed", "diverged"):
                if study is not None:
                    study.tell(number, state=optuna.trial.TrialState.FAIL)
            else:
                left.append(number)
        name = signal.Signals(stopped_by or signal.SIGINT).name
        log.warning("Search stopped by %s: %s run again when it continues (the same command, "
                    "the same hydra.sweep.dir)", name, _ranges(left) or "no trial")
        raise SearchInterrupted(name)

    def __getattr__(self, name):
        return getattr(self.launcher, name)


FINISHED = ("COMPLETE", "FAIL", "PRUNED")


def _spans(indices, numbers):
    """``[(start, end)]`` of the runs of consecutive ``indices`` (sorted) whose trial
    ``numbers`` are consecutive too: one launch each, its jobs numbered on from the first."""
    spans = []
    for i in indices:
        if spans and spans[-1][1] == i and numbers[i] == numbers[i - 1] + 1:
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

    from octconv_exp.records.outputs import write_text_atomic

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
        def setup(self, **kwargs):
            from octconv_exp.sweeps.search import plain_optuna_logs

            plain_optuna_logs()  # before the study is created (Optuna's first log line)
            return super().setup(**kwargs)

        def sweep(self, arguments):
            from octconv_exp.cli.outcome import fail
            from octconv_exp.errors import UserError
            from octconv_exp.training.rundir import lock_sweep_dir
            from octconv_exp.training.stopping import PROCESS

            impl = self.sweeper
            sweep_dir = str(impl.config.hydra.sweep.dir)
            target = int(impl.n_trials)
            try:
                lock_sweep_dir(sweep_dir)  # makes the dir: the study's SQLite file goes in it
                new_record = check_study(impl, arguments, sweep_dir)
                done, first = self._continue_study(impl, sweep_dir)
                if new_record is not None:
                    record_study(sweep_dir, new_record)
                PROCESS.sweep_stop.start(sweep_dir)
            except UserError as exc:
                fail(str(exc))
            impl.n_trials = max(0, target - done)
            if done:
                log.info("Study %s holds %d finished trial(s) of %d: running %d more",
                         impl.study_name, done, target, impl.n_trials)
            impl.launcher = _TrialNamedLauncher(impl.launcher, first, impl, sweep_dir)
            _watch_trials(impl, impl.launcher)
            if done:
                _reseed(impl, done)
            if impl.n_trials == 0:
                return None  # the report still runs (the multirun-end callback)
            try:
                result = impl.sweep(arguments)
            except SearchInterrupted:
                return None  # the report follows; run.py exits 128 + the signal
            _unique_front(sweep_dir)
            return result

        @staticmethod
        def _continue_study(impl, sweep_dir):
            """``(finished trials, number of the next trial)`` of the study this sweep
            continues (0, 0 for a new one). Trials left RUNNING by a sweep that was
            interrupted or killed are put back in the queue (WAITING), so that Optuna asks
            them again first, with their number and parameters. A trial dir holding a record
            of a trial the study does not have (a new study, an emptied optuna.db) is
            refused: the search would write over it."""
            import optuna

            from octconv_exp.errors import UserError

            study = None
            try:
                if impl.storage is not None:
                    try:
                        study = optuna.load_study(study_name=impl.study_name,
                                                  storage=impl.storage)
                    except KeyError:  # no such study yet
                        study = None
                trials = study.trials if study is not None else []
            except Exception as exc:  # noqa: BLE001 - SQLAlchemy's or a storage's own errors
                raise UserError(unreadable_storage(impl.storage, sweep_dir, exc)) from None
            foreign = [n for n in _recorded_trials(sweep_dir) if n >= len(trials)]
            if foreign:
                has = f"has {len(trials)} trial(s)" if trials else "is new"
                raise UserError(
                    f"hydra.sweep.dir={sweep_dir}: {_ranges(foreign)} hold(s) the records of "
                    f"trials that study {impl.study_name} ({impl.storage}) does not have (it "
                    f"{has}); a search would write over them: continue the study they belong "
                    "to (restore its optuna.db), or choose another hydra.sweep.dir")
            if study is None:
                return 0, 0
            for trial in trials:
                if trial.state.name == "RUNNING":
                    study._storage.set_trial_state(trial._trial_id,
                                                   optuna.trial.TrialState.WAITING)
                    log.warning("Trial %d was interrupted: it runs again first%s", trial.number,
                                " (from its checkpoint)" if os.path.exists(os.path.join(
                                    _trial_dir(sweep_dir, trial.number), "checkpoints",
                                    "last.pt")) else "")
            done = sum(1 for t in trials if t.state.name in FINISHED)
            return done, len(trials)
