"""``run.py --help``: this project's page (conf/hydra/help/octconv_exp.yaml), whose list of
config groups is generated here from the YAML files Hydra finds, so that it never drifts from
conf/ and never offers the ConfigStore's schema entries (``cifar10_schema``, ...), which a
command line may not choose."""
from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from omegaconf import OmegaConf

from .presets import CONFIG_DIR

#: Config sources whose options a user may choose: files and packages, not the ConfigStore.
_STRUCTURED = "structured"


def _sources():
    """The config sources of the running Hydra app (conf/, --config-dir, plugins' packages);
    conf/ alone when no Hydra app is running."""
    hydra = GlobalHydra.instance()
    if hydra.is_initialized():
        return [s for s in hydra.config_loader().get_sources() if s.scheme() != _STRUCTURED]

    return [FileConfigSource(provider="main", path=CONFIG_DIR)]


def group_options():
    """``{group: sorted option names}`` of every group a user chooses from (not ``hydra/``)."""
    found = {}

    def walk(source, group):
        for name in source.list(group, ObjectType.CONFIG):
            found.setdefault(group, set()).add(name)
        for sub in source.list(group, ObjectType.GROUP):
            walk(source, f"{group}/{sub}")

    for source in _sources():
        for top in source.list("", ObjectType.GROUP):
            if top != "hydra":
                walk(source, top)
    return {group: sorted(names) for group, names in sorted(found.items())}


def config_groups(_root_=None):
    """Resolver ``${octconv_exp.config_groups:}``: one line per group, its options, and the
    option this command line uses."""
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default=None) if _root_ else None
    groups = group_options()
    width = max((len(g) for g in groups), default=0) + 1
    lines = []
    for group, options in groups.items():
        line = f"{group + ':':<{width}} {', '.join(options)}"
        if choices is not None and group in choices:
            line += f"   (in use: {choices[group] if choices[group] is not None else 'none'})"
        lines.append(line)
    return "\n".join(lines)
