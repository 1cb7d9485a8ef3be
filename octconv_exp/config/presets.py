"""Your own presets, found the way Hydra finds them, and every value a sweep will run.

``run.py --config-dir DIR`` and ``hydra.searchpath=[file://DIR]`` add DIR to Hydra's config
search path after ``conf/``: ``conf/config.yaml`` stays the primary config and DIR's
``experiment/*.yaml`` (and other group options) become options beside ours. run.py's pre-check
composes with the same search path (:func:`hydra_like_run`), so what it accepts is what Hydra
runs.

A sweep's values come from the command line and from the composed ``hydra.sweeper.params``
(a preset's sweep): :func:`sweep_choices` lists, per swept key, the values the sweeper will
run (a grid: all of them; an Optuna search: every ``choice``, and the ends of each
``interval``/``range``, which is what is checkable before the sampler picks), so that run.py
and ``python -m octconv_exp.validate`` validate each before the first job starts.
"""
import contextlib
import copy
import os
from collections import OrderedDict

from hydra import version
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobRuntime
from omegaconf import OmegaConf

from ..errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: run.py's file: Hydra resolves a relative --config-path against its folder.
RUN_PY = os.path.join(REPO, "run.py")
#: The primary config: conf/config.yaml.
CONFIG_DIR = os.path.join(REPO, "conf")
CONFIG_NAME = "config"
#: Groups whose options interact (``python -m octconv_exp.validate`` composes every
#: combination; a key that is not read may be meant as one of them).
GROUPS = ("conv", "optimizer", "scheduler", "dataset", "ipu")


def search_path(config_path="conf", config_dir=None):
    """Hydra's config search path for ``run.py [--config-path P] [--config-dir D]``
    (hydra/_internal/utils.py run_hydra: D goes after the primary dir, before the schemas)."""
    path = create_automatic_config_search_path(RUN_PY, None, config_path)
    if config_dir is not None:
        path.prepend(provider="command-line", path=f"file://{os.path.abspath(config_dir)}",
                     anchor=SearchPathQuery(provider="schema"))
    return path


@contextlib.contextmanager
def hydra_like_run(config_path="conf", config_dir=None):
    """Hydra's global state as run.py sets it up, for ``hydra.compose``."""
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name="run", config_search_path=search_path(config_path,
                                                                             config_dir))
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


@contextlib.contextmanager
def compositions_reused():
    """Within it, a config Hydra's loader has composed is composed once: the same inputs get
    a deep copy of it. run.py composes its command line's config in :func:`.preflight` (to
    check it before Hydra starts) and Hydra's main composes the same config again to run it
    (about 0.5 s each here); with this, that second composition is a copy of the first.

    The inputs are all that ``ConfigLoaderImpl.load_configuration`` reads (hydra/_internal/
    config_loader_impl.py, hydra-core 1.3): its arguments (but ``from_shell``, which only
    words the error of a composition that fails, and a failure is not kept), the search path,
    and what ``_load_configuration_impl`` copies into the ``hydra`` node: the working
    directory, the environment (``hydra.job.env_copy``), the job's name and Hydra's version
    base. Hydra's main composes with ``hydra.mode=RUN`` added where the config leaves the
    mode unset: that composition is the first's with the override applied
    (:func:`with_run_mode`). The first composition only is kept (run.py's: the command
    line's, or a sweep's first combination), as composed, before anyone resolves an interpolation in it (a
    resolved ``${now:...}`` is cached in the config it was resolved in).

    Every other composition (``python -m octconv_exp.validate``'s hundreds, a sweep's
    jobs) reads each config file once: ``ConfigRepository.load_config`` (the parsed file
    and its defaults list) hands out a copy of its first read of that path in that search
    path (a third of a composition's time here). Files only: a ConfigStore node may still
    be added (a plugin's) and is looked up each time. A file changed while this context is
    open is not read again. Within another such context this one is that one."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.config_repository import ConfigRepository

    original = ConfigLoaderImpl.load_configuration
    if getattr(original, "reuses_compositions", False):  # within one already: that one
        yield
        return
    load_file = ConfigRepository.load_config
    made, files = {}, {}

    def load_config(self, config_path):
        key = (tuple((source.provider, source.path) for source in self.sources), config_path)
        if key in files:
            return copy.deepcopy(files[key])
        loaded = load_file(self, config_path)
        if loaded is not None and loaded.path.split("://")[0] in FILE_SCHEMES:
            files[key] = copy.deepcopy(loaded)
        return loaded

    def load_configuration(self, config_name, overrides, run_mode, from_shell=True,
                           validate_sweep_overrides=True):
        key = composition_inputs(self, config_name, overrides, run_mode,
                                 validate_sweep_overrides)
        if key in made:
            return copy.deepcopy(made[key])
        if tuple(overrides[-1:]) == (RUN_MODE_OVERRIDE,):
            first = made.get(composition_inputs(self, config_name, overrides[:-1], run_mode,
                                                validate_sweep_overrides))
            if first is not None and first.hydra.mode is None:
                return with_run_mode(first)
        cfg = original(self, config_name=config_name, overrides=overrides, run_mode=run_mode,
                       from_shell=from_shell,
                       validate_sweep_overrides=validate_sweep_overrides)
        if not made:
            made[key] = copy.deepcopy(cfg)
        return cfg

    load_configuration.reuses_compositions = True
    ConfigLoaderImpl.load_configuration = load_configuration
    ConfigRepository.load_config = load_config
    try:
        yield
    finally:
        ConfigLoaderImpl.load_configuration = original
        ConfigRepository.load_config = load_file


#: Config sources whose configs are files (a folder, a package's data): their loads are
#: kept by :func:`compositions_reused`.
FILE_SCHEMES = ("file", "pkg")

#: What Hydra's main adds to a command line whose config leaves ``hydra.mode`` unset (None)
#: when it runs one job (hydra/_internal/utils.py, ``_run_app``).
RUN_MODE_OVERRIDE = "hydra.mode=RUN"


def with_run_mode(cfg):
    """A copy of the composition ``cfg`` with :data:`RUN_MODE_OVERRIDE` applied as
    ``_load_configuration_impl`` applies an override of a value in the ``hydra`` node, the
    last on its command line: the value set, the override appended to
    ``hydra.overrides.hydra`` (a Hydra override is not in ``hydra.job.override_dirname``)."""
    cfg = copy.deepcopy(cfg)
    key, value = RUN_MODE_OVERRIDE.split("=")
    OmegaConf.update(cfg, key, value, merge=True)
    cfg.hydra.overrides.hydra.append(RUN_MODE_OVERRIDE)
    return cfg


def composition_inputs(loader, config_name, overrides, run_mode, validate_sweep_overrides):
    """What a composition by ``loader`` (a ConfigLoaderImpl) depends on, as a key."""
    return (tuple((e.provider, e.path) for e in loader.config_search_path.get_path()),
            config_name, tuple(overrides), run_mode, validate_sweep_overrides, os.getcwd(),
            tuple(sorted(os.environ.items())), str(OmegaConf.select(JobRuntime().conf, "name")),
            str(version.getbase()))


class TaskConfigs:
    """Task configs (a composition without its ``hydra`` node, as ``hydra.compose`` returns
    it by default) of many override lists of one config that differ in plain values: a
    sweep's jobs, a search space's choices. Hydra composes each list whole (its defaults
    tree, every file merged); here a list's plain values
    (:func:`applied_last`) are applied, with Hydra's own ``_apply_overrides_to_config``, to
    a copy of the composition of the rest, composed once. Hydra applies those values the
    same way after merging the rest (hydra/_internal/config_loader_impl.py,
    ``_load_configuration_impl``), in list order; values that no other override's key
    overlaps come out the same applied last. A list whose rest fails to compose is composed
    whole, so that its error is Hydra's, word for word. Within :func:`hydra_like_run`."""

    def __init__(self, config_name):
        self.config_name = config_name
        self.parser = OverridesParser.create()
        self.bases = {}
        self.repos = {}

    def _repo(self, searchpath):
        """Hydra's config repository for the search path these overrides give: what its
        defaults list asks whether a key is a config group (None: the primary config
        does not load; composing whole reports that)."""
        if searchpath not in self.repos:
            try:
                _, repo = GlobalHydra.instance().config_loader() \
                    ._parse_overrides_and_create_caching_repo(self.config_name, list(searchpath))
            except Exception:  # noqa: BLE001 - composing whole reports it
                repo = None
            self.repos[searchpath] = repo
        return self.repos[searchpath]

    def compose(self, overrides):
        """The task config ``hydra.compose(config_name, overrides)`` returns."""
        from hydra import compose
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        overrides = list(overrides)
        parsed = self.parser.parse_overrides(overrides)
        searchpath = tuple(o.input_line for o in parsed
                           if o.key_or_group == "hydra.searchpath")
        repo = self._repo(searchpath)
        last = applied_last(parsed, repo.group_exists) if repo is not None else []
        if not last:
            return compose(config_name=self.config_name, overrides=overrides)
        rest = tuple(o.input_line for o in parsed if not any(o is v for v in last))
        base = self.bases.get(rest)
        if base is None:
            try:
                base = compose(config_name=self.config_name, overrides=list(rest))
            except Exception:  # noqa: BLE001 - whole, for Hydra's own error in its order
                return compose(config_name=self.config_name, overrides=overrides)
            self.bases[rest] = base
        cfg = copy.deepcopy(base)
        ConfigLoaderImpl._apply_overrides_to_config(last, cfg)
        return cfg


def applied_last(parsed, is_group):
    """The overrides of ``parsed`` (Hydra Override objects) that may be applied to the
    composition of the others with the same result: ``key=value`` changes (no ``+``, ``++``
    or ``~``, no ``@package``, not a dict, not hydra.*) of a key that is not a config group
    (``is_group``: the repository's ``group_exists``, as Hydra's defaults list decides it)
    and that no other override's key equals, contains or lies inside."""
    def plain(o):
        return (not (o.is_delete() or o.is_add() or o.is_force_add() or o.is_sweep_override())
                and o.package is None and not o.is_hydra_override()
                and not isinstance(o.value(), dict) and not is_group(o.key_or_group))

    def key(o):
        return o.key_or_group.replace("[", ".").replace("]", "")

    values = [o for o in parsed if isinstance(o.value(), dict) or not is_group(o.key_or_group)
              or o.is_force_add()]  # what Hydra applies as a value (or refuses)

    def alone(o):
        k = key(o)
        return not any(v is not o and (key(v) == k or key(v).startswith(k + ".")
                                       or k.startswith(key(v) + ".")) for v in values)

    return [o for o in parsed if plain(o) and alone(o)]


def group_options_lookup(config_name, overrides):
    """A function of a config group's name: its options in every folder of the search path
    (the primary config's and the ``hydra.searchpath`` of ``overrides`` included), sorted;
    None when no folder has that group. Options only the ConfigStore holds (the ``*_schema``
    nodes) are not offered. The search path is found once for all the groups of a command
    line, as Hydra's ``get_group_options`` finds it on every call (reading the primary
    config: most of a call's time)."""
    searchpath = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") == "hydra.searchpath"]
    try:
        # Hydra's ConfigLoaderImpl.get_group_options, with the repository kept.
        _, repo = GlobalHydra.instance().config_loader()._parse_overrides_and_create_caching_repo(
            config_name, searchpath)
    except Exception:  # noqa: BLE001 - a missing primary config: composition reports it
        return lambda group: None

    def options_of(group):
        found = repo.get_group_options(group, ObjectType.CONFIG)
        try:
            stored = {name[:-5] for name in ConfigStore.instance().list(group)
                      if name.endswith(".yaml")}
        except IOError:
            stored = set()
        options = [o for o in found if o not in stored]
        return sorted(options) or None

    return options_of


def sweep_choices(sweeper, arguments):
    """Per key the sweep varies or sets, the ``key=value`` overrides its jobs get: the
    sweeper's ``params`` (a preset's sweep) merged with the command line's task overrides
    ``arguments`` as the sweeper merges them (params first, the command line wins)."""
    params = sweeper.get("params") or {}
    conf = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    parsed = OverridesParser.create().parse_overrides(conf)
    choices = OrderedDict()
    if "optuna" in str(sweeper.get("_target_", "")).lower():
        from hydra_plugins.hydra_optuna_sweeper._impl import (
            create_optuna_distribution_from_config,  # optional: a Hydra plugin that may not be installed
            create_optuna_distribution_from_override,
        )

        space = sweeper.get("search_space")
        if space and not params:  # the plugin's older form of params
            for key, node in space.items():
                choices[str(key)] = [f"{key}={v}" for v in
                                     _checkable(create_optuna_distribution_from_config(node))]
        for ov in parsed:
            key = ov.get_key_element()
            value = create_optuna_distribution_from_override(ov)
            choices[key] = ([f"{key}={v}" for v in _checkable(value)]
                            if ov.is_sweep_override() else [f"{key}={value}"])
        return list(choices.values())
    for ov in parsed:  # hydra's BasicSweeper.split_arguments
        key = ov.get_key_element()
        if ov.is_sweep_override() and not ov.is_discrete_sweep():
            raise UserError(f"{ov.input_line}: a grid sweep takes values (a,b,c or "
                            "range(...)); interval(...) is a search range: add search=optuna")
        if ov.is_sweep_override():
            choices[key] = [f"{key}={v}" for v in ov.sweep_string_iterator()]
        else:
            choices[key] = [f"{key}={ov.get_value_element_as_str()}"]
    return list(choices.values())


def _checkable(distribution):
    """What can be checked of an Optuna distribution before sampling: every choice, or the
    two ends of a range (optuna rounds a stepped range's upper end down onto its step)."""
    if hasattr(distribution, "choices"):
        return list(distribution.choices)
    low, high = distribution.low, distribution.high
    return [low] if low == high else [low, high]


def undecodable_files(overrides=()):
    """The .yaml files of the search path (and of ``overrides``' hydra.searchpath) that are not
    UTF-8 text: what Hydra fails on with a bare UnicodeDecodeError."""
    folders = [str(entry.path) for entry in
               GlobalHydra.instance().config_loader().get_search_path().get_path()]
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            folders += [v.strip(" '\"") for v in value.strip("[]").split(",")]
    found = []
    for folder in folders:
        folder = folder[len("file://"):] if folder.startswith("file://") else folder
        if not os.path.isabs(folder) or not os.path.isdir(folder):
            continue  # a package (pkg://) or the schemas: not the user's files
        for dirpath, _, names in sorted(os.walk(folder)):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                if not name.endswith(".yaml"):
                    continue
                try:
                    with open(path, "rb") as f:
                        f.read().decode("utf-8")
                except UnicodeDecodeError:
                    found.append(path)
                except OSError:
                    continue
    return found
