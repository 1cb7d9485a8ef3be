"""Sweep layout: readable, collision-free job directories, and the vanilla de-duplication.

A job of a multirun lives in ``<sweep dir>/<name>/seed=<seed>``, where ``<name>`` is what the
sweep varies, as ``key=value`` joined by commas (``conv=octave,alpha=0.25``), without the noise:
the seed (its own directory level) and paths (the data set root, the IPU cache, the profile
dir), which are replaced by a short hash of their values, so that two jobs never share a
directory. Overrides shared by every job of the sweep stay out of the name (they are in each
job's .hydra/overrides.yaml); ``defaults`` names a job without overrides.
"""
import hashlib
import os
import re
import sys

from omegaconf import OmegaConf

# Keys that say nothing about the experiment, or hold paths.
NOISE_KEYS = ("seed", "dataset.root", "ipu.cache_dir", "profile_dir", "trainer.progress_bar",
              "threads", "dataset.download", "dataset.verify_checksums")
SEED_KEY = "seed"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.,=+\-\[\]]")


def split_override(text):
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def is_noise(key):
    return key in NOISE_KEYS or key.startswith("hydra.") or key.startswith("hydra/")


LEADING_KEYS = ("conv", "alpha", "expansion")


def _name_order(item):
    key = item.split("=", 1)[0]
    return (LEADING_KEYS.index(key) if key in LEADING_KEYS else len(LEADING_KEYS), item)


def config_name(overrides, drop=()):
    """The readable name of a job's configuration (its overrides minus noise and ``drop``)."""
    kept, noise = [], []
    for text in overrides:
        key, value = split_override(text)
        if key in drop:
            continue
        if is_noise(key):
            if key != SEED_KEY and not key.startswith("hydra"):
                noise.append(f"{key}={value}")
            continue
        kept.append(f"{key}={_UNSAFE.sub('_', value)}")
    name = ",".join(sorted(kept, key=_name_order)) or "defaults"
    if noise:
        digest = hashlib.sha1("\n".join(sorted(noise)).encode()).hexdigest()[:6]
        name += f",~{digest}"
    return name


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


def job_dir(_root_):
    """Resolver ``${octconv_exp.job_dir:}``: ``<name>/seed=<seed>`` for the job's config."""
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or [])
    seed = OmegaConf.select(_root_, "seed", default=0)
    return f"{config_name(overrides)}/seed={seed}"


def register():
    if not OmegaConf.has_resolver("octconv_exp.job_dir"):
        OmegaConf.register_new_resolver("octconv_exp.job_dir", job_dir)
    if not OmegaConf.has_resolver("octconv_exp.pid"):
        # Cached like ${now:}, so a sweep's jobs (parallel workers too) agree on its directory;
        # two sweeps started in the same second differ by their process id.
        OmegaConf.register_new_resolver("octconv_exp.pid", lambda: str(os.getpid()),
                                        use_cache=True)
    # The sweeper is a Hydra plugin, which Hydra only loads from the hydra_plugins namespace
    # package: ours is shipped inside this package.
    plugins = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")
    if plugins not in sys.path:
        sys.path.append(plugins)


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
