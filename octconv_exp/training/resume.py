"""Resume and evaluate from the run's own record.

A checkpoint (and model.pt) holds the resolved config its run was made with. ``resume=true``
continues *that* run: the config comes from the checkpoint, and the command line may change
only what cannot change the results so far (:data:`MAY_CHANGE_ON_RESUME`); any other key it
sets to another value is refused, naming each. ``train=false`` evaluates the saved model on
the saved data set unless the command line says otherwise.
"""
import copy
import os
import shlex
import sys

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError

#: What a resumed run may change: how long it trains, how it reports (its figures too), where
#: and how fast it runs. Everything else (data set and its sizes/seed/root, batch size, optimizer and its
#: arguments, scheduler, seed, model, IPU batching) would change the results.
MAY_CHANGE_ON_RESUME = ("trainer.epochs", "trainer.early_stopping", "trainer.test_on",
                        "trainer.progress_bar",
                        "trainer.save_model",
                        "trainer.checkpoint", "trainer.test_batch_size", "logger", "threads",
                        "speed", "device", "ipu.cache_dir", "ipu.num_workers",
                        "ipu.use_ipu_model", "resume", "ckpt_path", "train", "deterministic",
                        "report")
#: Always this command's own, whatever the checkpoint says.
THIS_COMMAND = ("resume", "ckpt_path", "train", "profile_dir")
#: Group nodes whose saved option is taken whole (their keys differ from option to option).
WHOLE_NODES = ("optimizer", "scheduler", "dataset", "logger", "model")
#: What train=false takes from the checkpoint unless the command line sets it.
FROM_CHECKPOINT_ON_EVALUATION = ("model", "conv", "alpha", "expansion", "dataset", "seed",
                                 "optimizer", "scheduler", "trainer.epochs",
                                 "trainer.batch_size", "trainer.label_smoothing")


def explicit_keys(overrides, recorded=()):
    """The config keys a list of Hydra overrides sets (``conv=octave`` -> ``conv``), leaving
    out the ``recorded`` overrides (those preflight took from the run's record,
    ``cli.recorded_groups``: not the command's own choices)."""
    recorded = set(recorded)
    keys = []
    for ov in OverridesParser.create().parse_overrides([o for o in overrides
                                                        if o not in recorded]):
        key = ov.key_or_group
        if ov.package is None and not key.startswith("hydra"):
            keys.append(key)
    return keys


def _covers(prefixes, key):
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def _fill_missing(saved, current, path=""):
    """Keys a newer octconv-exp added, filled in from this command's config."""
    for key, value in current.items():
        where = f"{path}{key}"
        if key not in saved:
            saved[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(saved[key], dict) and where not in WHOLE_NODES:
            _fill_missing(saved[key], value, where + ".")


def _select(container, key):
    node = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _assign(container, key, value):
    parts = key.split(".")
    for part in parts[:-1]:
        container = container.setdefault(part, {})
    container[parts[-1]] = copy.deepcopy(value)


def _show(value):
    if isinstance(value, dict):  # a group's option: named by its name (conv: its mode)
        for key in ("name", "mode"):
            if key in value:
                return str(value[key])
    return str(value).replace(" ", "")


def config_for_resume(cfg, state, explicit, path):
    """The config ``resume=true`` continues with: the checkpoint's, with this command's
    allowed changes; UserError naming every key the command would change otherwise."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        check_epochs_cover_checkpoint(cfg, state, path)
        return cfg  # a checkpoint without its config: the identity check is all there is
    current = _plain(cfg)
    effective = copy.deepcopy(saved)
    _fill_missing(effective, current)
    differing = []
    for key in dict.fromkeys(explicit):
        now = _select(current, key)
        if _covers(MAY_CHANGE_ON_RESUME, key):
            _assign(effective, key, now)
        elif now != _select(effective, key):
            differing.append(key)
    for key in THIS_COMMAND:
        _assign(effective, key, current.get(key))
    if differing:
        was = ", ".join(f"{k}={_show(_select(effective, k))}" for k in differing)
        now = ", ".join(f"{k}={_show(_select(current, k))}" for k in differing)
        raise UserError(
            f"resume=true: {path} was trained with {was}; this command sets {now}, which would "
            "change its results. A resumed run takes its config from its checkpoint and may "
            "change only " + ", ".join(k for k in MAY_CHANGE_ON_RESUME if k not in THIS_COMMAND)
            + ": drop the other overrides, or start a new run")
    effective = OmegaConf.create(effective)
    check_epochs_cover_checkpoint(effective, state, path)
    return effective


def check_epochs_cover_checkpoint(cfg, state, path):
    """resume=true: ``trainer.epochs`` below what the checkpoint already trained would record
    a run of fewer epochs whose weights have seen more: refused, in one line."""
    done = int(state.get("epoch", 0) or 0)
    progress = state.get("progress")
    steps = int(progress.get("steps", 0) or 0) if isinstance(progress, dict) else 0
    trained = done + (1 if steps else 0)  # an epoch begun counts: its steps are in the weights
    epochs = int(cfg.trainer.epochs)
    if epochs >= trained:
        return
    what = f"{done} epoch{'s' if done != 1 else ''}"
    if steps:
        what += f" and {steps} step{'s' if steps != 1 else ''} of epoch {done + 1}"
    raise UserError(f"resume=true: trainer.epochs={epochs} is below what {path} already "
                    f"trained ({what}); resume with trainer.epochs={trained} or more (without "
                    "trainer.epochs it continues to the run's own), or start a new run")


def config_for_evaluation(cfg, state, explicit):
    """train=false: the model and data set (and what the run trained with) from the
    checkpoint ``state`` unless the command line sets them."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return cfg
    current = _plain(cfg)
    effective = copy.deepcopy(current)
    for key in FROM_CHECKPOINT_ON_EVALUATION:
        value = _select(saved, key)
        if value is None or any(k == key or key.startswith(k + ".") for k in explicit):
            continue  # the command sets this node (or one above it) itself
        _assign(effective, key, value)
        for k in explicit:  # keys the command sets inside it
            if k.startswith(key + "."):
                _assign(effective, k, _select(current, k))
    return OmegaConf.create(effective)


def hydra_quoted(value):
    """``value`` as a quoted Hydra override value (any character safe, = , and spaces too)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def resume_hint(output_dir, cfg=None):
    """A command that continues the run in ``output_dir`` when pasted into a shell (with the
    run's config ``cfg``: naming the classes of your own it uses, which a resume takes from
    the checkpoint only when the command names them, see :mod:`.targets`)."""
    from ..config.targets import user_targets  # deferred: loads torch; imported before torch at start-up
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("run.py") else "run.py"
    launcher = "python"
    if os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank: the same ranks again (a checkpoint inside an epoch needs them).
        local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ["WORLD_SIZE"]
        launcher = (f"torchrun --nproc_per_node={world}" if local == world
                    else f"torchrun --nnodes=... --nproc_per_node={local} (as before)")
    named = "".join(" " + shlex.quote(f"{key}={target}")
                    for key, target in (user_targets(cfg) if cfg is not None else []))
    return (f"{launcher} {shlex.quote(script)} resume=true "
            + shlex.quote(f"hydra.run.dir={hydra_quoted(output_dir)}") + named)


#: Overrides of a sweep's command line that its continuation replaces: its own resume and
#: sweep dir, and the attempt subdir preflight adds to a resume (``cli.keep_the_record``).
_REPLACED_ON_SWEEP_RESUME = ("resume=", "hydra.sweep.dir=", "hydra.output_subdir=.hydra/attempts/")


def sweep_resume_hint(argv, sweep_dir, search=False):
    """A command that continues the sweep in ``sweep_dir`` when pasted into a shell: the
    sweep's own command line ``argv`` (flags and overrides, every sweep value kept) with
    ``resume=true`` (a grid sweep: the interrupted jobs continue from their checkpoints, the
    others start) and that sweep dir. A search (``search=True``) continues from its study
    without ``resume=true``: the same command into the same dir (docs/search.md)."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("run.py") else "run.py"
    kept = [a for a in argv if not a.lstrip("+~").startswith(_REPLACED_ON_SWEEP_RESUME)]
    added = ([] if search else ["resume=true"]) + [
        f"hydra.sweep.dir={hydra_quoted(os.path.abspath(sweep_dir))}"]
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in kept + added])
