"""Sweep layout: readable, collision-free job directories, and the vanilla de-duplication.

A job of a multirun lives in ``<sweep dir>/<name>/seed=<seed>``, where ``<name>`` is what the
sweep varies, as ``key=value`` joined by commas (``conv=octave,alpha=0.25``), without the noise:
the seed (its own directory level) and paths (the data set root, the IPU cache, the profile
dir), which are replaced by a short hash of their values, so that two jobs never share a
directory. Overrides shared by every job of the sweep stay out of the name (they are in each
job's .hydra/overrides.yaml); ``defaults`` names a job without overrides.
"""
import os

import yaml
from omegaconf import OmegaConf

from ..config.resolvers import config_name, is_noise, split_override
from ..models.spec import recorded_model_name
from ..records.outputs import write_text_atomic
from ..training.resume import MAY_CHANGE_ON_RESUME


def job_subdirs(jobs, seed_of):
    """``<name>/seed=<seed>`` for every job of a sweep, naming each by what varies."""
    values = {}
    for job in jobs:
        for text in job:
            key, value = split_override(text)
            values.setdefault(key, set()).add(value)
    varying = {k for k, v in values.items() if len(v) > 1
               or sum(1 for job in jobs if any(split_override(o)[0] == k for o in job)) < len(jobs)}
    names = []
    for job in jobs:
        if len(jobs) > 1:
            shown = [o for o in job if split_override(o)[0] in varying]
        else:  # a single job: its overrides, without the noise (nothing to tell apart)
            shown = [o for o in job if not is_noise(split_override(o)[0])]
        names.append(f"{config_name(shown)}/seed={seed_of(job)}")
    return names


def dedupe_vanilla(jobs, conv_mode_of, seen=None):
    """Drop the jobs that would train the same vanilla model again (vanilla ignores alpha).

    ``jobs`` are override lists; ``conv_mode_of(job)`` composes a job and returns its conv
    mode. A vanilla job loses its alpha override; of several vanilla jobs that are then the
    same, the first is kept (``seen`` carries this across batches). Returns the kept jobs and
    how many were dropped."""
    seen = set() if seen is None else seen
    kept, dropped = [], 0
    for job in jobs:
        job = list(job)
        if conv_mode_of(job) == "vanilla":
            job = [o for o in job if split_override(o)[0] != "alpha"]
            key = tuple(sorted(job))
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
        kept.append(job)
    return kept, dropped


# ------------------------------------------------------------------------------ the job plan

#: The jobs the sweeper planned, in the sweep dir, written before any is launched, so that a
#: report can count the jobs that never started (an interrupted sweep, a partly scheduled
#: array job) as well as those that did.
PLAN_FILE = "jobs.yaml"
PLAN_VERSION = 1
#: The model of runs whose metrics.json (older runs) or config does not name one.
DEFAULT_MODEL = "seed_cnn"
#: What a plan entry records of the job's composed config: the fields metrics.json has.
PLAN_CONFIG_KEYS = (("conv", "conv.mode"), ("alpha", "alpha"), ("expansion", "expansion"),
                    ("optimizer", "optimizer.name"), ("seed", "seed"),
                    ("dataset", "dataset.name"), ("model", "model"),
                    ("epochs", "trainer.epochs"))
_PLAN_HEADER = (
    "# The jobs planned into this sweep dir by the octconv_exp sweeper, written before any was\n"
    "# launched (a re-run into the same dir adds its own). subdir: the job's run dir, relative\n"
    "# to this dir; overrides: its task overrides; config: what its metrics.json would say.\n"
    "# `python -m octconv_exp.report` lists a planned job without a run dir as missing.\n")


def reported_model_name(value):
    """A model as the report names it: a string, or a model config's ``name``; None when
    nothing names it."""
    if value is None:
        return None
    if hasattr(value, "items"):  # a dict, or a DictConfig
        if value.get("name") is not None or value.get("_target_") is not None:
            return recorded_model_name(value)  # as the job's metrics.json will say
        return None if value.get("arch") is None else str(value.get("arch"))
    return str(value)


def _plan_value(value):
    """A config value as jobs.yaml records it: a scalar as it is, anything else as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def plan_entry(subdir, overrides, cfg):
    """One job of the plan, from its composed config ``cfg``."""
    config = {}
    for name, key in PLAN_CONFIG_KEYS:
        try:
            value = OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - a broken interpolation: the job will say so itself
            value = None
        if name == "model":
            value = reported_model_name(value) or DEFAULT_MODEL
        config[name] = _plan_value(value)
    return {"subdir": subdir, "overrides": [str(o) for o in overrides], "config": config}


def _job_identity(overrides):
    """The overrides that say which job this is: without those a resume may change (more
    epochs, resume=true, ...), Hydra's own and the order."""
    kept = []
    for text in overrides:
        key = split_override(text)[0]
        if key.startswith("hydra.") or key.startswith("hydra/") or any(
                key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME):
            continue
        kept.append(text)
    return tuple(sorted(kept))


def merge_plans(old, new):
    """The plan of a sweep dir after a re-run: ``new``, and each job of ``old`` that the new
    plan has under neither its subdir nor its identity (the same job may be named otherwise
    when another set of overrides varies)."""
    subdirs = {os.path.normpath(e["subdir"]) for e in new}
    identities = {_job_identity(e.get("overrides") or []) for e in new}
    kept = [e for e in old if os.path.normpath(e["subdir"]) not in subdirs
            and _job_identity(e.get("overrides") or []) not in identities]
    return list(new) + kept


def read_plan(sweep_dir):
    """The plan of ``sweep_dir``: ``(entries, problems)``; entries is None without a plan
    file. Entries that are not a job are left out and named in ``problems``; an unreadable
    file is no plan and one problem."""
    path = os.path.join(sweep_dir, PLAN_FILE)
    if not os.path.exists(path):
        return None, []
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
        if isinstance(data, dict):
            data = data.get("jobs")
        if not isinstance(data, list):
            raise ValueError("no list of jobs")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        return None, [f"{PLAN_FILE}: {' '.join(str(exc).split())[:200]}; jobs that never "
                      "started cannot be counted"]
    entries, problems = [], []
    for i, entry in enumerate(data):
        subdir = entry.get("subdir") if isinstance(entry, dict) else None
        if not isinstance(subdir, str) or not subdir or os.path.isabs(subdir) or \
                os.path.normpath(subdir).split(os.sep)[0] in ("..", "."):
            problems.append(f"{PLAN_FILE}: job {i + 1} has no subdir inside the sweep dir; "
                            "left out")
            continue
        overrides = entry.get("overrides")
        overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
        config = entry.get("config")
        config = dict(config) if isinstance(config, dict) else {}
        entries.append({"subdir": subdir, "overrides": overrides, "config": config})
    return entries, problems


def write_plan(sweep_dir, entries):
    """Write the plan into ``sweep_dir`` atomically, merged with the plan a previous run into
    the same dir left (:func:`merge_plans`); returns the path."""
    old, _ = read_plan(sweep_dir)
    merged = merge_plans(old or [], entries)
    text = _PLAN_HEADER + yaml.safe_dump({"version": PLAN_VERSION, "jobs": merged},
                                         sort_keys=False, default_flow_style=None, width=100)
    path = os.path.join(sweep_dir, PLAN_FILE)
    os.makedirs(sweep_dir, exist_ok=True)
    write_text_atomic(path, text)
    return path
