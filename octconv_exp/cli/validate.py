"""Validate every configuration a user can compose, for CI: no data, no training.

    python -m octconv_exp.validate [--config-dir DIR ...] [--override KEY=VALUE ...] [--trust-code]

Composes every combination of the options of the groups that shape training (conv,
optimizer, scheduler, dataset, ipu), each model in each conv mode, each logger and search
option on its own, and every experiment preset; validates each against the schema and the ranges (without looking at this machine: no CUDA
or data folders needed), builds each model on the meta device, and prints one line per
invalid configuration (run.py's message); each preset's sweep is checked value by value
(``hydra.sweeper.params``; of a search, every choice and both ends of each range).

No code a configuration names outside octconv-exp (a preset's ``model._target_``) is imported
or run unless ``--trust-code`` is given: such a configuration is checked without it and
reported as not validated. Exit status 1 if a configuration is invalid, else 2 if one was not
validated fully (or the command or a file is unusable), else 0.

``--config-dir DIR``: a folder with its own ``config.yaml`` is validated as a primary config
dir of its own; a folder without one adds its groups (e.g. your ``experiment/`` presets) to
ours. ``--only-added`` checks only what the folders bring: their own primary configs, and the
configurations that use one of their options (your presets, your options with ours), not
the few hundred shipped ones again. ``--override`` applies to every configuration (e.g. ``dataset.root=/data``).
``--jobs N`` composes in N processes (default: one per core; Hydra's compose takes ~0.1 s a
configuration, so a few hundred combinations take tens of seconds on one core).
"""
import argparse
import contextlib
import difflib
import itertools
import multiprocessing
import os
import sys

import yaml
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ..config import schema as config  # noqa: F401  (the schema and resolvers)
from ..config.presets import (
    CONFIG_DIR,
    CONFIG_NAME,
    GROUPS,
    TaskConfigs,
    compositions_reused,
    hydra_like_run,
    sweep_choices,
)
from ..config.schema import validate, without_config_code
from ..errors import UserError
from .preflight import combine, describe_composition_error, group_options

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


class NotText(Exception):
    """A config file that is not text at all (the validator stops: exit 2)."""


def scan_config_dir(config_dir):
    """Problems a config dir has before any composition: folders and files octconv-exp would
    not read (a misspelt group, a .yml file), and YAML syntax errors (one line per file).
    Returns ``(problems, broken)``: the lines and the absolute paths of unparsable files."""
    problems, broken = [], set()
    root = os.path.abspath(config_dir)
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            if name.startswith(".") or name == "__pycache__":
                continue
            if name not in KNOWN_FOLDERS:
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
                with open(file, encoding="utf-8") as f:
                    yaml.safe_load(f)
            except UnicodeDecodeError as exc:
                raise NotText(f"{file}: not a YAML text file (not UTF-8: byte {exc.start} "
                              f"cannot be decoded); remove it or save it as UTF-8") from None
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


def check(overrides_for, config_dir, config_name, search_dirs, extra, sweeps=(),
          trust_code=False, indexed=False):
    """Validate each configuration (and, for the labels in ``sweeps``, every value its
    ``hydra.sweeper.params`` sweeps). Returns ``(kind, label, detail)`` findings: kind
    "invalid", or "untrusted" for a valid configuration whose ``_target_`` code outside
    octconv-exp was not run (``detail``: key=target); ``(index, finding)`` with ``indexed``."""
    findings = []
    searchpath = [f"hydra.searchpath=[{','.join('file://' + os.path.abspath(d) for d in search_dirs)}]"] \
        if search_dirs else []
    GlobalHydra.instance().clear()
    try:
        with hydra_like_run(os.path.abspath(config_dir)), compositions_reused():
            configs = TaskConfigs(config_name)
            for index, (label, overrides) in enumerate(overrides_for):
                before = len(findings)
                findings += _check_one(label, searchpath + overrides + extra, config_name,
                                       trust_code)
                if label in sweeps and len(findings) == before:
                    findings += _check_sweep(label, searchpath, overrides + extra, config_name,
                                             trust_code, configs)
                if indexed:
                    findings[before:] = [(index, f) for f in findings[before:]]
    finally:
        GlobalHydra.instance().clear()
    return findings


def _check_one(label, overrides, config_name, trust_code, configs=None):
    with (contextlib.nullcontext([]) if trust_code else without_config_code()) as skipped:
        try:
            cfg = (configs.compose(overrides) if configs is not None
                   else compose(config_name=config_name, overrides=overrides))
            validate(cfg, check_environment=False)  # builds the model on meta too
        except UserError as exc:
            return [("invalid", label, str(exc))]
        except (HydraException, OmegaConfBaseException) as exc:
            return [("invalid", label, describe_composition_error(exc))]
        except ValueError as exc:  # the model refused the configuration
            return [("invalid", label, f"model: {exc}")]
    return [("untrusted", label, f"{key}={target}") for key, target in dict(skipped).items()]


def _check_sweep(label, searchpath, overrides, config_name, trust_code, configs):
    """Every value the configuration's sweep runs (run.py -m): its hydra.sweeper.params with
    ``overrides``, each job validated; one finding per distinct problem."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    hydra_part = searchpath + [o for o, ov in zip(overrides, parsed)
                               if ov.key_or_group.startswith("hydra")]
    task = [o for o in overrides if o not in hydra_part]
    try:
        full = compose(config_name=config_name, overrides=hydra_part + task,
                       return_hydra_config=True)
        jobs = combine(sweep_choices(full.hydra.sweeper, task))
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        return [("invalid", f"{label} (its sweep)", describe_composition_error(exc))]
    findings, seen = [], set()
    for job in jobs:
        values = [o for o in job if o not in task]
        if not values:
            continue  # the configuration itself: checked already
        for kind, _, detail in _check_one(label, hydra_part + job, config_name, trust_code,
                                          configs):
            if (kind, detail) not in seen:
                seen.add((kind, detail))
                findings.append((kind, f"{label} swept to {' '.join(values)}", detail))
    return findings


def _check_share(args):
    """One worker's share: every ``jobs``-th configuration from ``start``, with its index."""
    combos, start, jobs, rest = args
    share = combos[start::jobs]
    found = check(share, *rest, indexed=True)
    return [(start + i * jobs, finding) for i, finding in found]


def check_all(combos, config_dir, config_name, search_dirs, extra, jobs=1, sweeps=(),
              trust_code=False):
    """:func:`check` over ``jobs`` processes; the findings in the order of ``combos``."""
    jobs = max(1, min(int(jobs), len(combos) // 8 or 1))
    rest = (config_dir, config_name, search_dirs, extra, sweeps, trust_code)
    if jobs == 1:
        return check(combos, *rest)
    # fork: the workers start with this process's imports (Hydra's state is cleared in each).
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        shares = pool.map(_check_share, [(combos, i, jobs, rest) for i in range(jobs)])
    return [finding for _, finding in sorted(item for share in shares for item in share)]


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
    parser.add_argument("--trust-code", action="store_true",
                        help="import and run the code a configuration names outside "
                             "octconv-exp (a model._target_ of your own) to check it; without "
                             "it that code is not run and such a configuration is reported "
                             "as not validated (exit 2)")
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

    runs = [(CONFIG_DIR, [d for d in args.config_dir
                          if not os.path.exists(os.path.join(d, CONFIG_NAME + ".yaml"))])]
    runs += [(d, []) for d in args.config_dir if os.path.exists(os.path.join(d, CONFIG_NAME + ".yaml"))]
    total, problems, broken, untrusted = 0, [], set(), {}
    for d in args.config_dir:  # what composition would skip or choke on, one line each
        try:
            found, bad = scan_config_dir(d)
        except NotText as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
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
        # Sweeps: each preset's, and the primary config's own (seen in the first combination).
        sweeps = {label for label, _ in combos if label.startswith("experiment=")}
        sweeps |= {combos[0][0]} if combos else set()
        found = check_all(combos, config_dir, CONFIG_NAME, extra_dirs, args.override, args.jobs,
                          sweeps=sweeps, trust_code=args.trust_code)
        prefix = "" if config_dir == CONFIG_DIR else f"{config_dir}: "
        for kind, label, detail in found:
            if kind == "invalid":
                problems.append(f"{prefix}{label}: {detail}")
            else:
                untrusted.setdefault(detail, []).append(prefix + label)
    for line in problems:
        print(f"invalid: {line}")
    for target, labels in untrusted.items():
        more = f" and {len(labels) - 1} more" if len(labels) > 1 else ""
        print(f"not validated: {target} ({labels[0]}{more}): code from outside octconv-exp is "
              "not imported or run without --trust-code; the rest of the configuration is "
              "valid")
    if not args.quiet:
        skipped = sum(len(labels) for labels in untrusted.values())
        print(f"{total} configurations checked, {len(problems)} invalid"
              + (f", {skipped} not validated (--trust-code)" if skipped else ""))
    return 1 if problems else (2 if untrusted else 0)


if __name__ == "__main__":
    sys.exit(main())
