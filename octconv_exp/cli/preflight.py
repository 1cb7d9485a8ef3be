"""The command line around run.py: errors a user causes end in one line and a non-zero exit.

Two places can reject a command line:
- composition (an unknown group option, an unknown key, a value of the wrong type): Hydra
  would print several lines; :func:`preflight` composes the config first (every value of every
  sweep) and reports the first problem in one line;
- validation (ranges, cross-key rules, missing data, devices): :func:`.outcome.run_task`
  catches :class:`~octconv_exp.errors.UserError`, records it in the run's ``metrics.json``
  and exits.

This module is what happens before Hydra starts (argv checks, quoting, recorded groups,
output-dir checks); :mod:`.outcome` is what happens when a run ends.
"""
import contextlib
import copy
import itertools
import logging
import os
import shlex
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import yaml
from hydra import compose
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from ..backends.distributed import launched_rank
from ..config.keys import not_read
from ..config.presets import (
    CONFIG_NAME,
    GROUPS,
    TaskConfigs,
    compositions_reused,
    group_options_lookup,
    hydra_like_run,
    sweep_choices,
    undecodable_files,
)
from ..config.schema import validate
from ..errors import USER_ERROR_EXIT, UserError
from ..training.resume import hydra_quoted
from ..training.rundir import describe, live_holder, record_in_the_way
from ..training.stopping import PROCESS

log = logging.getLogger("octconv_exp")

MAX_PREFLIGHT_COMBINATIONS = 256


def exit_with(code):
    """End the process with ``code``, its last word said: a signal that arrives while it
    exits ends it with this status and no further line (:class:`.stopping.ProcessState`)."""
    PROCESS.exit_with(code)


def fail(message, code=USER_ERROR_EXIT):
    """Print one line to stderr and exit with the user-error status (or ``code``)."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    exit_with(code)


def one_line(text):
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())


def describe_composition_error(exc):
    """One line for a Hydra/OmegaConf composition error: the key, then what is wrong (and the
    config file that set it, when a preset or group option did)."""
    # Hydra re-raises a merge error of a config file inside its except block (__context__).
    cause = exc if isinstance(exc, OmegaConfBaseException) else (exc.__cause__ or exc.__context__)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        message = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0].strip()
        if "not in" in message:
            message += suggest_keys(cause)
        text = str(exc)
        if cause is not exc and text.startswith("In '"):  # "In 'experiment/x': ... raised"
            message += f" (set in {text[4:].split(chr(39), 1)[0]})"
        return f"{cause.full_key}: {message}"
    return one_line(str(exc).split("Config search path")[0])


def suggest_keys(cause):
    """For an unknown key: the closest keys that exist beside it, else where a key of that
    name lives (never ``+key``: a key the code does not read does nothing)."""
    parent = getattr(cause, "parent_node", None)
    key = str(getattr(cause, "key", "") or str(cause.full_key).rsplit(".", 1)[-1])
    try:
        keys = [str(k) for k in parent.keys()] if parent is not None else []
        root = parent._get_root() if parent is not None else None
    except Exception:  # noqa: BLE001 - a node we cannot list: no suggestion
        keys, root = [], None
    groups = [g for g in GROUPS + ("experiment",)
              if g not in keys] if "." not in str(cause.full_key) else []
    full_key = str(cause.full_key)
    if not full_key.endswith(key):
        full_key = key
    return "; " + not_read(full_key, keys, root, groups)


def group_options(config_dir, group):
    path = os.path.join(config_dir, group)
    if not os.path.isdir(path):
        return None
    return sorted(f[:-5] for f in os.listdir(path) if f.endswith(".yaml"))


def _split_args(argv):
    """Hydra's own argument parser: (flags namespace, overrides)."""
    args = get_args_parser().parse_args(argv)
    return args, list(args.overrides or [])


def _override_combinations(overrides):
    """Override lists covering every value of every sweep (the product when small)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for ov, text in zip(parsed, overrides):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            if ov.is_interval_sweep():  # a search's range (search=optuna): its two ends
                values = [f"{key}={v}" for v in (ov.value().start, ov.value().end)]
            else:
                values = [f"{key}={v}" for v in ov.sweep_string_iterator()]
            choices.append(values or [text])
        else:
            choices.append([text])
    return combine(choices)


def combine(choices, limit=MAX_PREFLIGHT_COMBINATIONS):
    """Override lists taking every value of every list in ``choices``: their product when it
    has at most ``limit`` members, else each value once with the first of the others."""
    total = 1
    for c in choices:
        total *= len(c)
    if total <= limit:
        return [list(combo) for combo in itertools.product(*choices)]
    combos = []  # too many: vary one sweep at a time
    base = [c[0] for c in choices]
    for i, c in enumerate(choices):
        for value in c:
            combo = list(base)
            combo[i] = value
            combos.append(combo)
    return combos


#: Groups whose options combine (each in its own package): logger=[csv,tensorboard,mlflow].
MULTI_OPTION_GROUPS = ("logger",)


def _check_group_choices(overrides, options_of):
    """Each group choice of ``overrides`` must be an option ``options_of(group)`` lists."""
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if ov.package is not None or ov.is_delete() or key.startswith("hydra"):
            continue
        options = options_of(key)
        if options is None:
            continue
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.value()]
        if key in MULTI_OPTION_GROUPS and len(values) == 1 and isinstance(values[0], list):
            values = values[0]  # several options at once: logger=[tensorboard,mlflow]
        for value in values:
            if not isinstance(value, str) or value not in options:
                fail(f"{key}={value}: not an option of config group '{key}'; "
                     f"choose one of: {', '.join(options)}")


def check_output_dir(cfg, multirun):
    """The run (or sweep) dir must be creatable: its nearest existing ancestor a writable
    directory. Hydra would otherwise fail with a traceback before the run starts."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"

    target = os.path.abspath(str(OmegaConf.select(cfg, key)))
    ancestor = target
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is not a directory" if not os.path.isdir(ancestor) else "is not writable"
        fail(f"{key}={target}: cannot create the output dir ({ancestor} {what}); choose "
             f"another with {key}=PATH")
    problem = path_too_long(target, ancestor, below=(JOB_SUBDIR_ROOM if multirun else 0))
    if problem:
        fail(f"{key}: {problem}; choose a shorter one with {key}=PATH")


#: The longest path a run writes below its dir (.hydra/attempts/<time>-<pid>/overrides.yaml,
#: checkpoints/last.pt.<temp suffix>, tensorboard event files), with room to spare.
FILES_ROOM = 120
#: What a sweep's job subdir may add (``config.resolvers.config_name`` caps each name at 200 bytes).
JOB_SUBDIR_ROOM = 200 + len("/seed=") + 20


def path_too_long(target, existing_ancestor, below=0):
    """Why ``target`` cannot hold a run, or None: a name longer than the file system takes,
    or a path that, with the files a run writes below it, is longer than it allows."""
    try:
        name_max = os.pathconf(existing_ancestor, "PC_NAME_MAX")
        path_max = os.pathconf(existing_ancestor, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows): common limits
        name_max, path_max = 255, 4096
    for name in target.split(os.sep):
        if len(os.fsencode(name)) > name_max:
            return (f"the name {name[:40]}... is {len(os.fsencode(name))} bytes long, and this "
                    f"file system takes {name_max} at most")
    need = len(os.fsencode(target)) + below + FILES_ROOM
    if need > path_max:
        return (f"the path is {len(os.fsencode(target))} bytes long; with the files a run "
                f"writes below it ({below + FILES_ROOM} bytes) it would pass this file "
                f"system's limit of {path_max}")
    return None


#: Overrides whose value is a path: quoted for Hydra when they hold = , or spaces, so that a
#: run dir copied from summary.md (``conv=octave,alpha=0.25/seed=0``) works unquoted.
PATH_KEYS = ("ckpt_path", "hydra.run.dir", "hydra.sweep.dir", "profile_dir", "dataset.root")


def quote_paths(argv, multirun):
    """argv with the values of :data:`PATH_KEYS` quoted for Hydra's override parser."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        # Under -m a comma sweeps ckpt_path=a,b or dataset.root=a,b; Hydra's own keys cannot
        # be swept (Hydra refuses), so there a comma is part of the path.
        special = "=" in value or any(c.isspace() for c in value) or (
            "," in value and (not multirun or key.lstrip("+").startswith("hydra.")))
        if (eq and key.lstrip("+") in PATH_KEYS and value and value[0] not in "'\"" and special
                and "${" not in value):
            arg = f"{key}={hydra_quoted(value)}"
        out.append(arg)
    return out


def check_override_grammar(overrides, multirun):
    """Each override must parse in Hydra's override grammar: one line naming the override
    and how to write it otherwise (Hydra raises with a traceback from wherever it first
    parses the command line)."""
    parser = OverridesParser.create()
    for text in overrides:
        try:
            parser.parse_overrides([text])
        except OverrideParseException as exc:
            fail(describe_grammar_error(text, exc, multirun, hydra_quoted))


def describe_grammar_error(text, exc, multirun, hydra_quoted):
    key, eq, value = text.partition("=")
    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if any("\udc80" <= c <= "\udcff" for c in text):
        # Bytes that are not UTF-8 (surrogate-escaped by Python): no quoting helps, the
        # config files Hydra writes are UTF-8 text.
        return (f"{shown}: not valid UTF-8; octconv-exp's values (and run dirs) must be UTF-8 "
                "text: choose another name")
    reason = one_line(str(exc).split("See https://")[0])
    reason = reason.replace(f"Error parsing override '{text}' ", "")
    if reason.startswith("LexerNoViableAltException"):
        reason = "a character it does not take unquoted"
    if eq and key.lstrip("+~") in PATH_KEYS:
        quoted = shlex.quote(f"{key}={hydra_quoted(value)}")
        return (f"{text}: Hydra's override grammar takes ( ) [ ] {{ }} and quotes in a value "
                f"only when the value is quoted for Hydra; write it as {quoted}")
    return (f"{text}: not a valid Hydra override ({reason}); quote a value with special "
            "characters for Hydra, e.g. 'key=\"a value (1)\"', or write a list as "
            "key=[a,b]" + (", a sweep as key=a,b" if multirun else ""))


def _sets(overrides, key, value):
    for ov in OverridesParser.create().parse_overrides(overrides):
        if ov.key_or_group == key and not ov.is_sweep_override() and ov.value() == value:
            return True
    return False


def keep_the_record(overrides):
    """resume=true and train=false write their own Hydra files apart from the run's
    (``.hydra/attempts/<time>-<pid>``), so a refused attempt never changes the record."""
    if any(o.startswith(("hydra.output_subdir=", "++hydra.output_subdir=")) for o in overrides):
        return overrides
    if _sets(overrides, "resume", True) or _sets(overrides, "train", False):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return overrides + [f"hydra.output_subdir=.hydra/attempts/{stamp}-{os.getpid()}"]
    return overrides


RECORD_GROUPS = ("model", "conv", "dataset", "optimizer", "scheduler", "logger", "ipu",
                 "experiment")
#: Keys a group option requires (``???`` in conf/): recorded with the groups, so that a
#: resumed image folder run composes without its dataset.root on the command line.
RECORD_REQUIRED = ("dataset.root", "dataset._target_")


@dataclass
class Launch:
    """What :func:`preflight` hands run.py: the argv Hydra should see, and the overrides in
    it that came from the run's record (:func:`recorded_groups`), which run.py's task function
    passes on to the run (they are not the command's own choices)."""
    argv: List[str]
    recorded_overrides: List[str] = field(default_factory=list)
    #: (config name, overrides, hydra.mode) of the command line preflight composed whole (no
    #: sweep in it): what Hydra's main would compose once more only to read ``hydra.mode``.
    composed_mode: Optional[Tuple[str, Tuple[str, ...], Any]] = None

    @contextlib.contextmanager
    def hydra_mode_known(self):
        """Hydra's main with these overrides, told ``hydra.mode`` instead of composing the
        whole config for it once more (``Hydra.get_mode`` in hydra/_internal/hydra.py:
        a composition whose only result read is ``cfg.hydra.mode``, about 0.6 s of a run's
        start here). Any other call (another config name, other overrides) composes as
        Hydra does."""
        if self.composed_mode is None:
            yield
            return
        from hydra._internal.hydra import Hydra

        composed_name, composed, mode = self.composed_mode
        original = Hydra.get_mode

        def get_mode(hydra_self, config_name, overrides):  # Hydra calls it with keywords
            if (config_name == composed_name
                    and tuple(o for o in overrides if not _attempt_subdir(o)) == composed):
                return mode
            return original(hydra_self, config_name=config_name, overrides=overrides)

        Hydra.get_mode = get_mode
        try:
            yield
        finally:
            Hydra.get_mode = original


def _attempt_subdir(override):
    """run.py's own ``hydra.output_subdir`` for a resumed run's attempt: not composed."""
    return override.startswith("hydra.output_subdir=.hydra/attempts/")


def recorded_groups(overrides):
    """resume=true / train=false of one run: the group options the run was made with (its
    .hydra/overrides.yaml) that the command does not choose, to compose with, so that a key of
    its data set or model (``dataset.train_size`` of a synthetic run) composes; the
    checkpoint's config still decides the values (:mod:`.resume`)."""
    if not (_sets(overrides, "resume", True) or _sets(overrides, "train", False)):
        return []
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - the composition below reports it in one line
        return []
    given = {ov.key_or_group: ov for ov in parsed}
    where = None
    if "ckpt_path" in given and given["ckpt_path"].value() is not None:
        where = str(given["ckpt_path"].value())
        if not os.path.isdir(where):
            where = os.path.dirname(os.path.abspath(where))
            if os.path.basename(where) == "checkpoints":
                where = os.path.dirname(where)
    elif "hydra.run.dir" in given:
        where = str(given["hydra.run.dir"].value())
    record = os.path.join(where, ".hydra", "overrides.yaml") if where else None
    if record is None or not os.path.isfile(record):
        return []
    try:
        with open(record) as f:
            recorded = [str(o) for o in (yaml.safe_load(f) or [])]
        taken = [ov.input_line for ov in parser.parse_overrides(recorded)
                 if ov.key_or_group in RECORD_GROUPS + RECORD_REQUIRED
                 and ov.key_or_group not in given
                 and ov.package is None and not ov.is_sweep_override()]
    except Exception:  # noqa: BLE001 - an unreadable record: compose from the command alone
        return []
    return taken


def preflight(argv):
    """Compose (and validate) what argv asks for before Hydra starts any job; returns the
    :class:`Launch`: the argv Hydra should see (path values quoted, attempt files kept apart,
    a resume's recorded group options added)."""
    try:
        args, overrides = _split_args(argv)
    except SystemExit:
        return Launch(argv)  # argparse already said what is wrong
    modes = [flag for flag, on in (("--run", args.run), ("--multirun", args.multirun),
                                   ("--cfg", args.cfg), ("--info", args.info),
                                   ("--shell-completion", args.shell_completion)) if on]
    if len(modes) > 1:  # Hydra raises a ValueError with a traceback for this
        fail(f"{' and '.join(modes)} cannot be combined: give one of --run, --multirun, --cfg, "
             "--info and --shell-completion")
    if args.help or args.hydra_help or args.info or args.shell_completion or args.run:
        return Launch(argv)
    flags = argv[:len(argv) - len(overrides)] if overrides else list(argv)
    recorded = []
    if overrides and argv[len(argv) - len(overrides):] == overrides:
        overrides = quote_paths(overrides, args.multirun)
        check_override_grammar(overrides, args.multirun)
        if args.cfg is None:
            overrides = keep_the_record(overrides)
        if not args.multirun:
            recorded = recorded_groups(overrides)
            overrides = recorded + overrides
        argv = flags + overrides

    if args.config_dir and not os.path.isdir(args.config_dir):
        fail(f"--config-dir {args.config_dir}: not a directory (it adds a folder of your own "
             "presets and group options: DIR/experiment/NAME.yaml)")
    config_name = args.config_name or CONFIG_NAME
    overrides = [o for o in overrides if not _attempt_subdir(o)]
    try:
        combos = _override_combinations(overrides)
    except HydraException as exc:
        fail(one_line(exc))

    # The search path run.py's Hydra will use: conf/ (or --config-path), then --config-dir
    # and hydra.searchpath, so your own presets compose here as they will there.
    try:
        with hydra_like_run(args.config_path or "conf", args.config_dir), compositions_reused():
            options_of = group_options_lookup(config_name, overrides)
            _check_group_choices(overrides, options_of)
            # The first with Hydra's own node too: the output dir's checks read it (one
            # composition fewer per run; a composition is most of preflight's time).
            full = _compose_and_validate(combos[0], config_name, args.cfg is None,
                                         with_hydra=True)
            # The other combinations and a sweep's values mostly differ in plain values:
            # those are applied to a copy of one composition (TaskConfigs).
            configs = TaskConfigs(config_name)
            for combo in combos[1:]:
                _compose_and_validate(combo, config_name, args.cfg is None, configs=configs)
            composed = {frozenset(combo) for combo in combos}
            if args.multirun and args.cfg is None:
                _validate_sweep_values(overrides, combos, config_name, composed, options_of,
                                       configs)
            if args.cfg is None:
                check_output_dir(full, args.multirun)

                if not args.multirun and launched_rank() == 0:  # rank 0 holds the lock

                    # Before Hydra writes into it: refuse a run dir another live run holds.
                    run_dir = str(OmegaConf.select(full, "hydra.run.dir"))
                    holder = live_holder(run_dir)
                    if holder is not None:
                        fail(describe(holder, run_dir))
                    if full.get("train", True) and not full.get("resume", False):
                        problem = record_in_the_way(os.path.abspath(run_dir))
                        if problem:
                            fail(problem)
    except UserError as exc:
        fail(str(exc))
    except (HydraException, OmegaConfBaseException) as exc:  # a bad hydra.searchpath
        fail(describe_composition_error(exc))
    composed_mode = None
    if combos == [overrides]:  # no sweep: Hydra's get_mode would compose this very config
        composed_mode = (config_name, tuple(overrides), OmegaConf.select(full, "hydra.mode"))
    return Launch(argv, recorded, composed_mode)


def _compose_and_validate(overrides, config_name, check, note="", with_hydra=False,
                          configs=None):
    """Compose ``overrides`` and (``check``) validate the config a run gets; returns the
    composition, with its ``hydra`` node when ``with_hydra``. The config validated is then the
    task's config as Hydra hands it to the run: the composition without that node.
    ``configs``: a :class:`TaskConfigs` that composes the task config (not with_hydra)."""
    try:
        if configs is not None and not with_hydra:
            full = configs.compose(overrides)
        else:
            full = compose(config_name=config_name, overrides=overrides,
                           return_hydra_config=with_hydra)
        if check:
            validate(without_hydra(full) if with_hydra else full)
        return full
    except (HydraException, OmegaConfBaseException) as exc:  # also a broken ${...}
        fail(describe_composition_error(exc) + note)
    except UnicodeDecodeError as exc:  # a binary file where a YAML option should be

        files = undecodable_files(overrides) or ["a config file"]
        fail(f"{files[0]}: not a YAML text file (not UTF-8: {exc.reason} at byte {exc.start}); "
             "remove it or save it as UTF-8" + note)
    except UserError as exc:
        raise UserError(str(exc) + note) from None


def without_hydra(full):
    """A copy of a composition without its ``hydra`` node, as Hydra's run_job hands the
    task its config (hydra/core/utils.py: deepcopy, then ``del task_cfg["hydra"]``)."""
    cfg = copy.deepcopy(full)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _validate_sweep_values(overrides, combos, config_name, composed, options_of, configs):
    """Every value the sweeper will run, the composed ``hydra.sweeper.params`` (a preset's
    sweep, a search space) merged with the command line's sweeps as the sweeper merges them,
    validated before the first job. ``combos``: the command line's, already validated."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = {}

    def shapes_the_sweeper(ov):
        """A group choice (a preset, search=optuna) or hydra.*: decides hydra.sweeper."""
        key = ov.key_or_group
        if key.startswith("hydra") or ov.package is not None:
            return True
        if key not in groups:
            groups[key] = options_of(key) is not None
        return groups[key]

    shaping = [i for i, ov in enumerate(parsed) if shapes_the_sweeper(ov)]
    hydra_at = [i for i, ov in enumerate(parsed) if ov.key_or_group.startswith("hydra")]
    # One sweep per choice of what shapes the sweeper (experiment=a,b: two sweeps); in it the
    # command line's other overrides as given, sweeps included.
    sweeps = OrderedDict()
    for combo in combos:
        sweeps.setdefault(tuple(combo[i] for i in shaping), combo)
    limit = max(1, MAX_PREFLIGHT_COMBINATIONS // len(sweeps))
    for combo in sweeps.values():
        full = compose(config_name=config_name, overrides=combo, return_hydra_config=True)
        sweeper = full.hydra.sweeper
        hydra_part = [combo[i] for i in hydra_at]
        task = [combo[i] if i in shaping else overrides[i]
                for i in range(len(overrides)) if i not in hydra_at]
        params = set(str(k) for k in (sweeper.get("params") or {}))
        for job in combine(sweep_choices(sweeper, task), limit):
            if frozenset(job + hydra_part) in composed:
                continue
            composed.add(frozenset(job + hydra_part))
            from_params = [o for o in job if o.split("=", 1)[0] in params
                           and o not in task]
            note = (f" (the sweep's job with {' '.join(from_params)} from hydra.sweeper.params)"
                    if from_params else "")
            _compose_and_validate(hydra_part + job, config_name, True, note, configs=configs)
