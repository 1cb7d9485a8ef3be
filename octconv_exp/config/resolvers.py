"""The resolvers conf/ interpolates (``${octconv_exp.job_dir:}``, ``${octconv_exp.now:...}``,
``${octconv_exp.pid:}``, ``${octconv_exp.directions:...}``, ``${octconv_exp.config_groups:}``),
registered with the schema, and the readable name of a job's configuration that names its
run dir in a sweep."""
import datetime
import hashlib
import os
import re
import sys

from omegaconf import OmegaConf

from ..backends.distributed import LAUNCH_PID_ENV, LAUNCH_TIME_ENV
from ..records.objectives import OBJECTIVES, directions
from .helppage import config_groups

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


#: The longest job name (a folder name in the sweep dir), below the usual 255-byte limit.
MAX_NAME_BYTES = 200


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
    if len(name.encode()) > MAX_NAME_BYTES:
        # A sweep over many keys: past what a file system takes as one name (255 bytes).
        # Keep the readable start, and a digest of the whole so names stay distinct.
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        head = name.encode()[:MAX_NAME_BYTES - len(digest) - len(",...~")].decode("utf-8", "ignore")
        name = f"{head},...~{digest}"
    return name


def job_dir(_root_):
    """Resolver ``${octconv_exp.job_dir:}``: ``<name>/seed=<seed>`` for the job's config."""
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=[]) or [])
    seed = OmegaConf.select(_root_, "seed", default=0)
    return f"{config_name(overrides)}/seed={seed}"


def objective_directions(objectives):
    """Resolver ``${octconv_exp.directions:${search.objectives}}``."""
    unknown = [str(o) for o in objectives if str(o) not in OBJECTIVES]
    if unknown:  # the config validation names them; the sweeper must not fail first
        return ["maximize"] * len(objectives)
    return directions(objectives)


def launch_pid():
    """Resolver ``${octconv_exp.pid:}``: this process's id, or under torchrun rank 0's
    (distributed.agree_on_launch), so that every rank names the same run dir."""
    return os.environ.get(LAUNCH_PID_ENV) or str(os.getpid())


def launch_time(pattern):
    """Resolver ``${octconv_exp.now:pattern}``: Hydra's ``${now:}`` (the local time, as
    strftime formats it), or under torchrun rank 0's launch time."""
    stamp = os.environ.get(LAUNCH_TIME_ENV)
    when = datetime.datetime.fromtimestamp(float(stamp)) if stamp else datetime.datetime.now()
    return when.strftime(pattern)


def register():
    if not OmegaConf.has_resolver("octconv_exp.job_dir"):
        OmegaConf.register_new_resolver("octconv_exp.job_dir", job_dir)
    if not OmegaConf.has_resolver("octconv_exp.pid"):
        # Cached like ${now:}, so a sweep's jobs (parallel workers too) agree on its directory;
        # two sweeps started in the same second differ by their process id.
        OmegaConf.register_new_resolver("octconv_exp.pid", launch_pid, use_cache=True)
    if not OmegaConf.has_resolver("octconv_exp.now"):
        OmegaConf.register_new_resolver("octconv_exp.now", launch_time, use_cache=True)
    if not OmegaConf.has_resolver("octconv_exp.directions"):
        # hydra.sweeper.direction of a search: one per objective of search.objectives.
        OmegaConf.register_new_resolver("octconv_exp.directions", objective_directions)
    if not OmegaConf.has_resolver("octconv_exp.config_groups"):
        # run.py --help (conf/hydra/help/octconv_exp.yaml): the groups of conf/ and options.
        OmegaConf.register_new_resolver("octconv_exp.config_groups", config_groups)
    add_plugins_to_path()


#: The folder holding our ``hydra_plugins`` namespace package (the sweepers).
PLUGINS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins")


def add_plugins_to_path():
    """The sweeper is a Hydra plugin, which Hydra only loads from the hydra_plugins namespace
    package: ours is shipped inside this package, in :data:`PLUGINS_DIR`."""
    if PLUGINS_DIR not in sys.path:
        sys.path.append(PLUGINS_DIR)
