"""Did-you-mean for a config key octconv-exp does not read: the closest keys beside it, else
the places a key of that name has elsewhere (a key that moved: ``logger.tracking_uri`` is
``logger.mlflow.tracking_uri``), in the composed config or in a shipped group option."""
import difflib
import os

import yaml
from omegaconf import DictConfig

from .presets import CONFIG_DIR

#: Where every key is described.
REFERENCE = "docs/configuration.md"


def not_read(full_key, siblings=(), root=None, extra_candidates=()):
    """The hint for an unknown ``full_key``: "did you mean ...?" or where keys are described.
    ``siblings``: the keys beside it; ``root``: the composed config (a DictConfig) to look
    for a key of the same name in; ``extra_candidates``: more names beside it to match."""
    leaf = str(full_key).rsplit(".", 1)[-1]
    prefix = str(full_key)[:-len(leaf)]
    close = difflib.get_close_matches(leaf, [str(k) for k in siblings] + list(extra_candidates),
                                      n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(prefix + c for c in close) + "?"
    elsewhere = [p for p in (_paths_of(root, leaf) if root is not None else [])
                 if p != full_key]
    if not elsewhere:
        elsewhere = [p for p in shipped_places(leaf) if not p.startswith(full_key + " ")]
    if 0 < len(elsewhere) <= 3:  # more: a name too common to say which one was meant
        return "did you mean " + " or ".join(elsewhere) + "?"
    return f"it is not a setting octconv-exp reads ({REFERENCE})"


def _paths_of(node, leaf, prefix=""):
    """Dotted paths below ``node`` whose last key is ``leaf`` (Hydra's own node left out)."""
    found = []
    for key in node.keys():
        if not prefix and key == "hydra":
            continue
        path = prefix + str(key)
        if str(key) == leaf:
            found.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += _paths_of(child, leaf, path + ".")
    return found


_SHIPPED = {}


def shipped_places(leaf):
    """``key (with group=option)`` for each shipped group option (conf/) that sets a key named
    ``leaf``: where a key lives when its option is not the one chosen."""
    if not _SHIPPED:
        _SHIPPED.update(_index_shipped())
    return _SHIPPED.get(leaf, [])


def _index_shipped():
    index = {}
    for group in sorted(os.listdir(CONFIG_DIR)):
        folder = os.path.join(CONFIG_DIR, group)
        if group in ("hydra", "experiment") or not os.path.isdir(folder):
            continue  # presets set keys of other nodes, not where those keys live
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".yaml"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    text = f.read()
                node = yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError):
                continue
            package = group
            for line in text.splitlines()[:5]:
                if line.startswith("# @package "):
                    package = line.split(None, 2)[2].strip()
            base = "" if package == "_global_" else package + "."
            for path in _dict_paths(node):
                index.setdefault(path.rsplit(".", 1)[-1], []).append(
                    f"{base}{path} (with {group}={name[:-5]})")
    return index


def _dict_paths(node, prefix=""):
    paths = []
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key) == "defaults" and not prefix:
                continue
            paths.append(prefix + str(key))
            paths += _dict_paths(value, prefix + str(key) + ".")
    return paths
