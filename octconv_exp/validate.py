"""Validate every configuration a user can compose, for CI: no data, no training.

    python -m octconv_exp.validate [--config-dir DIR ...] [--override KEY=VALUE ...]

Composes every combination of the options of the groups that shape training (conv,
optimizer, scheduler, dataset, ipu), each model in each conv mode, each logger and search
option on its own, and every experiment preset; validates each against the schema and the ranges (without looking at this machine: no CUDA
or data folders needed), builds each model on the meta device, and prints one line per
invalid configuration; exit status 1 if any, 0 otherwise.

``--config-dir DIR``: a folder with its own ``config.yaml`` is validated as a primary config
dir of its own; a folder without one adds its groups (e.g. your ``experiment/`` presets) to
ours. ``--only-added`` checks only what the folders bring: their own primary configs, and the
configurations that use one of their options (your presets, your options with ours), not
the few hundred shipped ones again. ``--override`` applies to every configuration (e.g. ``dataset.root=/data``).
``--jobs N`` composes in N processes (default: one per core; Hydra's compose takes ~0.1 s a
configuration, so a few hundred combinations take tens of seconds on one core).
"""
import argparse
import itertools
import multiprocessing
import os
import sys

from .cli import CONFIG_DIR, CONFIG_NAME, describe_composition_error, group_options

#: Groups whose options interact: every combination is composed.
GROUPS = ("conv", "optimizer", "scheduler", "dataset", "ipu")
#: Groups whose options do not touch the training configuration: each option once.
SINGLE_GROUPS = ("logger", "search")


def _options(dirs, group, skip=()):
    found = set()
    for d in dirs:
        found.update(o for o in group_options(d, group) or []
                     if os.path.join(os.path.abspath(d), group, o + ".yaml") not in skip)
    return sorted(found)


#: What a config dir may hold: the primary config and these folders (Hydra's own under hydra/).
#: Checked once per conv mode each, not in the product above (each model builds on the meta
#: device; the other groups do not depend on which model it is).
MODEL_GROUP = "model"
KNOWN_FOLDERS = GROUPS + SINGLE_GROUPS + (MODEL_GROUP, "experiment", "hydra")


def scan_config_dir(config_dir):
    """Problems a config dir has before any composition: folders and files octconv-exp would
    not read (a misspelt group, a .yml file), and YAML syntax errors (one line per file).
    Returns ``(problems, broken)``: the lines and the absolute paths of unparsable files."""
    import yaml

    problems, broken = [], set()
    root = os.path.abspath(config_dir)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            if name.startswith(".") or name == "__pycache__":
                continue
            if name not in KNOWN_FOLDERS:
                import difflib

                close = difflib.get_close_matches(name, KNOWN_FOLDERS, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}/? " if close else ""
                problems.append(f"{path}: a folder octconv-exp does not read; {hint}config "
                                "groups are " + ", ".join(KNOWN_FOLDERS))
                continue
            files = [os.path.join(dirpath, f) for dirpath, _, fs in os.walk(path) for f in fs]
        elif name == CONFIG_NAME + ".yaml":
            files = [path]
        else:
            problems.append(f"{path}: not read (a config dir holds {CONFIG_NAME}.yaml and the "
                            "group folders)")
            continue
        for file in sorted(files):
            if not file.endswith(".yaml"):
                if not os.path.basename(file).startswith("."):
                    problems.append(f"{file}: not read (only .yaml files are config options)")
                continue
            if os.path.dirname(file) != path and name != "hydra" and file != path:
                problems.append(f"{file}: not read (options sit directly in their group "
                                "folder)")
                continue
            try:
                with open(file) as f:
                    yaml.safe_load(f)
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark is not None else ""
                what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                problems.append(f"{file}: YAML syntax error{where}: {what}")
                broken.add(file)
    return problems, broken


def combinations(dirs, skip=()):
    """(label, overrides) for every group combination and every experiment preset (leaving
    out the option files in ``skip``)."""
    groups = [g for g in GROUPS if _options(dirs, g, skip)]
    choices = [[f"{g}={o}" for o in _options(dirs, g, skip)] for g in groups]
    for combo in itertools.product(*choices):
        yield " ".join(combo), list(combo)
    for model in _options(dirs, MODEL_GROUP, skip):
        for conv in _options(dirs, "conv", skip) or [None]:
            combo = [f"{MODEL_GROUP}={model}"] + ([f"conv={conv}"] if conv else [])
            yield " ".join(combo), combo
    for group in SINGLE_GROUPS:
        for option in _options(dirs, group, skip):
            yield f"{group}={option}", [f"{group}={option}"]
    for preset in _options(dirs, "experiment", skip):
        yield f"experiment={preset}", [f"experiment={preset}"]


def added_options(dirs):
    """``group=option`` of every option file in ``dirs`` (folders added to ours)."""
    return {f"{g}={o}" for d in dirs for g in GROUPS + SINGLE_GROUPS + (MODEL_GROUP, "experiment")
            for o in group_options(d, g) or []}


def check(overrides_for, config_dir, config_name, search_dirs, extra, indexed=False):
    """Validate each configuration; returns a list of 'label: problem' lines (of
    ``(index, line)`` pairs with ``indexed``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import validate
    from .errors import UserError

    problems = []
    searchpath = [f"hydra.searchpath=[{','.join('file://' + os.path.abspath(d) for d in search_dirs)}]"] \
        if search_dirs else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=os.path.abspath(config_dir)):
            for index, (label, overrides) in enumerate(overrides_for):
                before = len(problems)
                try:
                    cfg = compose(config_name=config_name, overrides=searchpath + overrides + extra)
                    validate(cfg, check_environment=False)  # builds the model on meta too
                except UserError as exc:
                    problems.append(f"{label}: {exc}")
                except (HydraException, OmegaConfBaseException) as exc:
                    problems.append(f"{label}: {describe_composition_error(exc)}")
                except ValueError as exc:  # the model refused the configuration
                    problems.append(f"{label}: model: {exc}")
                if indexed and len(problems) > before:
                    problems[-1] = (index, problems[-1])
    finally:
        GlobalHydra.instance().clear()
    return problems


def _check_share(args):
    """One worker's share: every ``jobs``-th configuration from ``start``, with its index."""
    combos, start, jobs, rest = args
    share = combos[start::jobs]
    found = check(share, *rest, indexed=True)
    return [(start + i * jobs, line) for i, line in found]


def check_all(combos, config_dir, config_name, search_dirs, extra, jobs=1):
    """:func:`check` over ``jobs`` processes; the problems in the order of ``combos``."""
    jobs = max(1, min(int(jobs), len(combos) // 8 or 1))
    if jobs == 1:
        return check(combos, config_dir, config_name, search_dirs, extra)
    rest = (config_dir, config_name, search_dirs, extra)
    # fork: the workers start with this process's imports (Hydra's state is cleared in each).
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        shares = pool.map(_check_share, [(combos, i, jobs, rest) for i in range(jobs)])
    return [line for _, line in sorted(item for share in shares for item in share)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m octconv_exp.validate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-dir", action="append", default=[],
                        help="another config dir to validate (repeatable)")
    parser.add_argument("--override", action="append", default=[],
                        help="KEY=VALUE applied to every configuration (repeatable)")
    parser.add_argument("--only-added", action="store_true",
                        help="check only what the --config-dir folders bring: their own "
                             "primary configs, and configurations using one of their options")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes composing configurations (default: one per core)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        sys.stderr.write(f"error: --jobs {args.jobs}: must be an integer >= 1\n")
        return 2

    for d in args.config_dir:
        if not os.path.isdir(d):
            sys.stderr.write(f"error: --config-dir {d}: not a directory\n")
            return 2
    from . import config  # noqa: F401  (the schema and resolvers)

    runs = [(CONFIG_DIR, [d for d in args.config_dir
                          if not os.path.exists(os.path.join(d, CONFIG_NAME + ".yaml"))])]
    runs += [(d, []) for d in args.config_dir if os.path.exists(os.path.join(d, CONFIG_NAME + ".yaml"))]
    total, problems, broken = 0, [], set()
    for d in args.config_dir:  # what composition would skip or choke on, one line each
        found, bad = scan_config_dir(d)
        problems += found
        broken |= bad
    for config_dir, extra_dirs in runs:
        if os.path.join(os.path.abspath(config_dir), CONFIG_NAME + ".yaml") in broken:
            continue  # its primary config does not parse: nothing to compose
        combos = list(combinations([config_dir] + extra_dirs, broken))
        if args.only_added and config_dir == CONFIG_DIR:
            if not extra_dirs:
                continue  # only primary config dirs of their own were given
            mine = added_options(extra_dirs)
            combos = [c for c in combos if mine.intersection(c[1])]
        total += len(combos)
        found = check_all(combos, config_dir, CONFIG_NAME, extra_dirs, args.override, args.jobs)
        prefix = "" if config_dir == CONFIG_DIR else f"{config_dir}: "
        problems += [prefix + p for p in found]
    for line in problems:
        print(f"invalid: {line}")
    if not args.quiet:
        print(f"{total} configurations checked, {len(problems)} invalid")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
