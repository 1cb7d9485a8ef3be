"""Sweep reports: summary.csv, summary.md and plots, from the run directories on disk.

Used at the end of every multirun (the ``SweepReport`` Hydra callback) and on its own:

    python -m octconv_exp.report SWEEP_DIR

which also works after a sweep that ran on a cluster or was interrupted. Runs repeated with
several seeds are aggregated to mean and standard deviation per configuration (and model).
Vanilla runs ignore alpha: they appear once, without an alpha, and as a horizontal baseline in
the plots. A sweep dir holding the sweeper's job plan (``jobs.yaml``) also lists the planned
jobs that never started, as ``missing``. For a paper: the figures also as PDF/SVG
(``report.format``, ``report.dpi``), a 95 % confidence interval beside each std, and
``summary.tex`` (a booktabs table).
"""
import argparse
import csv
import io
import json
import math
import os
import re
import signal
import statistics
import sys
import zlib
from collections import OrderedDict

import yaml
from omegaconf import OmegaConf

from ..config.resolvers import NOISE_KEYS, SEED_KEY, config_name, split_override
from ..config.schema import DEFAULT_REPORT_DPI as DEFAULT_DPI
from ..config.schema import DEFAULT_REPORT_FORMATS as DEFAULT_FORMATS
from ..config.schema import REPORT_FORMATS, report_settings
from ..errors import USER_ERROR_EXIT, ConfigError, UserError
from ..records.figures import save as save_figure
from ..records.loggers import log_sweep
from ..records.objectives import OBJECTIVES, directions, pareto_front, value
from ..records.outputs import METRICS_FILE, OutputError, flatten, write_text_atomic
from ..sweeps.sweep import DEFAULT_MODEL, PLAN_CONFIG_KEYS, PLAN_FILE, read_plan, reported_model_name
from ..training.resume import sweep_resume_hint
from ..training.stopping import PROCESS
from . import latex
from .labels import place_labels
from .stats import ci95_half_width

CONV_ORDER = {"vanilla": 0, "octave": 1, "multi-octave": 2}
RUN_COLUMNS = ("conv", "model", "alpha", "expansion", "optimizer", "seed", "test_accuracy",
               "train_loss", "params", "flops_per_image", "train_images_per_second",
               "wall_seconds", "status", "error", "config", "run_dir", "val_accuracy",
               "best_epoch")
AGG_COLUMNS_HEAD = ("conv", "model", "alpha", "expansion", "optimizer", "n", "seeds", "params",
                    "flops_per_image")
AGG_METRICS = ("test_accuracy", "train_loss", "train_images_per_second", "wall_seconds",
               "val_accuracy")
PLOTS = ("accuracy_vs_alpha.png", "throughput_vs_alpha.png", "accuracy_vs_flops.png",
         "accuracy_vs_throughput.png")
#: The LaTeX table of the configurations (booktabs).
TEX_FILE = "summary.tex"
#: What a figure's file is named by in summary.md, best first (a browser shows png and svg).
SHOWN_FORMATS = ("png", "svg")
#: The non-dominated configurations for the sweep's search.objectives.
PARETO_FILE = "pareto.csv"
DEFAULT_OBJECTIVES = ("accuracy", "flops_per_image")
#: One colour per conv mode, the same in every figure.
CONV_COLORS = {"vanilla": "black", "octave": "tab:blue", "multi-octave": "tab:orange"}
#: Conv modes not in CONV_COLORS get one of these, picked by their name (so also the same in
#: every figure and every report).
OTHER_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                "tab:cyan")
#: Series of one conv mode that differ in something else (optimizer, model, ...): line styles
#: and markers, in the order of that something.
LINESTYLES = ("-", "--", "-.", ":")
VANILLA_LINESTYLES = ("--", ":", "-.", "-")
MARKERS = ("o", "s", "^", "D", "v", "P")
#: Overrides that do not change what a run computes, beside the noise config_name drops.
CONFIG_DROP = ("resume", "report.format", "report.dpi", "report.confusion_format")
NEVER_STARTED = f"never started (planned in {PLAN_FILE}, no run dir)"
#: Config keys that have columns of their own (conv, alpha, expansion, optimizer, model, seed).
SHOWN_KEYS = ("conv.mode", "alpha", "expansion", "optimizer.name", "model.name", "seed")
#: Config keys (and the keys under them) that do not change what a run computes: paths, how
#: it is shown and tracked, how it was started.
NOT_SETTINGS = NOISE_KEYS + ("resume", "ckpt_path", "logger", "search", "report", "hydra")
#: Groups whose other keys follow from the option chosen (optimizer=adam has betas, sgd
#: momentum): such a key varies only where runs of the same option differ in it.
OPTION_KEYS = {"model": "model.name", "optimizer": "optimizer.name", "conv": "conv.mode",
               "scheduler": "scheduler.name", "dataset": "dataset.name"}


class ReportError(Exception):
    pass


def find_runs(sweep_dir, problems=None):
    """Every run dir (one holding .hydra/ or metrics.json) under ``sweep_dir``, with its
    metrics (status 'missing' when a job never wrote them, e.g. killed) and overrides, and a
    'missing' row for each job of the sweep's plan (jobs.yaml) without a run dir (never
    started). What prevents counting the jobs that never started (an unreadable plan) is
    appended to ``problems``."""
    runs = []
    for root, dirs, files in os.walk(sweep_dir):
        dirs[:] = sorted(d for d in dirs if d not in (".submitit", "tensorboard"))
        if ".hydra" not in dirs and METRICS_FILE not in files:
            continue
        dirs[:] = [d for d in dirs if d != ".hydra"]
        overrides, problem = [], None
        overrides_file = os.path.join(root, ".hydra", "overrides.yaml")
        if os.path.exists(overrides_file):
            try:
                with open(overrides_file) as f:
                    loaded = yaml.safe_load(f) or []
                if not isinstance(loaded, list):
                    raise ValueError("not a list of overrides")
                overrides = [str(o) for o in loaded]
            except (OSError, ValueError, yaml.YAMLError) as exc:
                problem = f".hydra/overrides.yaml: {' '.join(str(exc).split())[:200]}"
        metrics = None
        metrics_file = os.path.join(root, METRICS_FILE)
        if os.path.exists(metrics_file):
            try:
                with open(metrics_file) as f:
                    metrics = json.load(f)
                if not isinstance(metrics, dict):
                    raise ValueError(f"a JSON {type(metrics).__name__}, not an object")
            except (OSError, ValueError) as exc:
                metrics = {"status": "unreadable", "error": f"metrics.json: {exc}"}
        if metrics is None:
            # What the job was to be, from the config it started with.
            metrics = dict(_config_values(os.path.join(root, ".hydra", "config.yaml")),
                           status="missing", error="no metrics.json (killed or still running?)")
        if problem and metrics.get("status") == "completed":
            metrics = dict(metrics, status="unreadable", error=problem)
        row = _row(root, sweep_dir, metrics, overrides)
        row["settings"], row["derived"] = run_settings(os.path.join(root, ".hydra", "config.yaml"))
        runs.append(row)
    runs += _never_started(sweep_dir, runs, problems)
    return runs


def _never_started(sweep_dir, runs, problems):
    """A 'missing' row for each planned job (jobs.yaml) that has no run dir among ``runs``."""
    plan, plan_problems = read_plan(sweep_dir)
    for text in plan_problems:
        sys.stderr.write(f"warning: {text}\n")
        if problems is not None:
            problems.append(text)
    if not plan:
        return []
    seen = {os.path.normpath(r["run_dir"]) for r in runs}
    rows = []
    for entry in plan:
        subdir = os.path.normpath(entry["subdir"])
        if subdir in seen:
            continue
        seen.add(subdir)
        run_dir = os.path.join(sweep_dir, subdir)
        error = NEVER_STARTED if not os.path.exists(run_dir) else \
            "a run dir without .hydra/ or metrics.json (never started?)"
        rows.append(_row(run_dir, sweep_dir, dict(entry["config"], status="missing", error=error),
                         entry["overrides"]))
    return rows


def run_settings(path):
    """A run's composed config (.hydra/config.yaml), flattened to ``{dotted key: value}``
    with interpolations resolved where they can be, and the keys that were interpolations
    (``T_max: ${trainer.epochs}``); ``(None, set())`` when it cannot be read."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None, set()
    if not isinstance(raw, dict):
        return None, set()
    try:
        cfg = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation this process cannot resolve: as saved
        cfg = raw
    flat, derived = flatten(cfg), flatten(raw)
    return flat, {k for k, v in derived.items() if isinstance(v, str) and "${" in v}


def _not_a_setting(key):
    return key in SHOWN_KEYS or any(key == k or key.startswith(k + ".") for k in NOT_SETTINGS)


def varying_keys(runs):
    """The config keys whose values differ between ``runs`` (those with a config), beside
    the columns every report has: what else tells their rows apart. A key under a group
    (``optimizer.lr``) varies only between runs of the same option (``optimizer.name``); a
    key set by interpolation (``scheduler.T_max: ${trainer.epochs}``) varies with what it
    names, which is shown."""
    with_config = [r["settings"] for r in runs if r.get("settings")]
    derived = set().union(*[r.get("derived") or set() for r in runs])
    keys = sorted({k for settings in with_config for k in settings
                   if not _not_a_setting(k) and k not in derived})
    varying = []
    for key in keys:
        option = OPTION_KEYS.get(key.split(".", 1)[0])
        values = {}
        for settings in with_config:
            if key in settings:
                scope = settings.get(option) if option and option != key else None
                values.setdefault(_hashable(scope), set()).add(_hashable(settings[key]))
        if any(len(v) > 1 for v in values.values()):
            varying.append(key)
    return varying


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def setting_value(row, key):
    """A varying config key's value in a run or a group (None: not recorded)."""
    settings = row.get("settings") or {}
    return settings.get(key)


def _config_values(path):
    """The fields of metrics.json that a run's .hydra/config.yaml holds ({} when it cannot
    be read)."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    values = {}
    for name, key in PLAN_CONFIG_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if name == "model":
            node = reported_model_name(node)
        if node is not None and (name == "model" or not isinstance(node, (dict, list))):
            values[name] = node
    return values


def _number(value):
    """A metric as a number (a numeric string converted to float), or None when a file holds
    something else (a word, a list, a bool)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(value):
    """A name-like field (data set, optimizer) as a string, or None."""
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def _row(run_dir, sweep_dir, m, overrides):
    conv = m.get("conv") or _override(overrides, "conv")
    conv = None if conv is None else str(conv)
    alpha = _number(m.get("alpha"))
    if alpha is None:
        alpha = _number(_override(overrides, "alpha"))
    seed = m.get("seed")
    if seed is None:
        seed = _override(overrides, SEED_KEY)
    if not isinstance(seed, int) or isinstance(seed, bool):
        number = _number(seed)
        seed = int(number) if number is not None and float(number).is_integer() else None
    epochs = _number(m.get("epochs"))
    row = {
        "conv": conv, "model": reported_model_name(m.get("model")) or DEFAULT_MODEL,
        "alpha": None if conv == "vanilla" else alpha,
        "expansion": m.get("expansion"), "optimizer": m.get("optimizer"), "seed": seed,
        "test_accuracy": _number(m.get("test_accuracy")), "train_loss": _number(m.get("train_loss")),
        "val_accuracy": _number(m.get("val_accuracy")), "best_epoch": _number(m.get("best_epoch")),
        "params": _number(m.get("params")), "flops_per_image": _number(m.get("flops_per_image")),
        "train_images_per_second": _number(m.get("train_images_per_second")),
        "wall_seconds": _number(m.get("wall_seconds")), "status": str(m.get("status", "unknown")),
        "error": m.get("error"),
        # The configuration a seed repeats: the overrides minus seeds, paths and resume=true
        # (a job first run by a resumed sweep has it), and alpha for vanilla, which ignores it.
        "config": config_name(overrides, drop=CONFIG_DROP + (("alpha",) if conv == "vanilla"
                                                              else ())),
        "run_dir": os.path.relpath(run_dir, sweep_dir),
        # For the figures' titles (not columns of summary.csv).
        "dataset": _text(m.get("dataset")),
        "epochs": int(epochs) if epochs is not None and float(epochs).is_integer() else epochs,
    }
    return row


def _override(overrides, key):
    for text in overrides:
        k, v = split_override(text)
        if k == key:
            return v
    return None


def _sort_key(row):
    alpha = row["alpha"] if row["alpha"] is not None else -1.0
    return (CONV_ORDER.get(row["conv"], 99), str(row["conv"]), alpha, row["config"],
            str(row.get("model")), row["seed"] if isinstance(row["seed"], int) else -1,
            row["run_dir"])


def aggregate(runs, varying=None):
    """Completed runs grouped by configuration, model and the config keys that vary between
    the runs (``varying``; by default :func:`varying_keys` of ``runs``): mean, std (n > 1)
    and count of each metric (``<metric>_n``: the runs that had it). ``n`` counts a group's
    runs, ``seeds`` lists its distinct seeds (a seed run twice is one seed, two runs)."""
    if varying is None:
        varying = varying_keys(runs)
    groups = OrderedDict()
    for row in sorted(runs, key=_sort_key):
        if row["status"] != "completed":
            continue
        # What the columns show is part of what a configuration is, whatever the overrides
        # said (runs of two presets, or of an edited one, may have the same overrides).
        setting = tuple(_hashable(setting_value(row, k)) for k in varying) + tuple(
            _hashable(row[k]) for k in ("conv", "alpha", "expansion", "optimizer"))
        groups.setdefault((row["config"], row.get("model") or DEFAULT_MODEL, setting),
                          []).append(row)
    out = []
    for (config, model, _), rows in groups.items():
        first = rows[0]
        seeds = _distinct(r["seed"] for r in rows)
        agg = {"conv": first["conv"], "model": model, "alpha": first["alpha"],
               "expansion": first["expansion"], "optimizer": first["optimizer"],
               "config": config, "n": len(rows),
               "seeds": ",".join(str(s) for s in seeds),
               # A run whose seed is not recorded may be another seed: counted as one.
               "n_seeds": len(seeds) + sum(1 for r in rows if r["seed"] is None),
               "settings": {k: setting_value(first, k) for k in varying},
               "params": first["params"], "flops_per_image": first["flops_per_image"],
               "datasets": _distinct(r.get("dataset") for r in rows),
               "epoch_counts": _distinct(r.get("epochs") for r in rows)}
        for metric in AGG_METRICS:
            values = [r[metric] for r in rows if isinstance(r[metric], (int, float))]
            agg[metric] = statistics.fmean(values) if values else None
            agg[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else None
            agg[metric + "_ci95"] = ci95_half_width(values)
            agg[metric + "_n"] = len(values)
        out.append(agg)
    return out


def _distinct(values):
    """The distinct values that are not None, sorted (numbers before text)."""
    return tuple(sorted({v for v in values if v is not None},
                        key=lambda v: (not isinstance(v, (int, float)), v if isinstance(
                            v, (int, float)) else 0, str(v))))


def _fmt(value, digits=2):
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def _pm(mean, std, digits=2):
    if mean is None:
        return "—"
    return _fmt(mean, digits) + (f" ± {_fmt(std, digits)}" if std is not None else "")


def readable(text):
    """``text`` as UTF-8 can hold it: a file name that is not UTF-8 (its bytes surrogate-
    escaped by Python) shows those bytes as ``\\xff``, as the run's own error lines do."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def write_csv(path, rows, columns):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text_atomic(path, readable(buf.getvalue()))


def describe_setup(rows):
    """``data: cifar10; model: seed_cnn; epochs: 10`` for runs or groups, listing every
    distinct value where they differ."""
    datasets, models, epochs = set(), set(), set()
    for r in rows:
        datasets.update(r["datasets"] if "datasets" in r else [r.get("dataset")])
        models.add(r.get("model") or DEFAULT_MODEL)
        epochs.update(r["epoch_counts"] if "epoch_counts" in r else [r.get("epochs")])

    def join(values):
        values = _distinct(values)
        return ", ".join(_fmt(v) for v in values) if values else "unknown"

    return f"data: {join(datasets)}; model: {join(models)}; epochs: {join(epochs)}"


def seeds_text(counts, unit="seeds"):
    """What the error bars of points aggregated over ``counts`` runs each show (``unit``:
    "runs" where a seed was run more than once)."""
    counts = sorted({int(n) for n in counts if n})
    if not counts:
        return ""
    if counts[-1] <= 1:
        return f"1 {unit[:-1]} per point (no error bars)"
    if len(counts) == 1:
        return f"mean ± std over {counts[0]} {unit}"
    return f"mean ± std over N={counts[0]}-{counts[-1]} {unit}"


def markdown(sweep_dir, runs, groups, problems=(), varying=(), formats=DEFAULT_FORMATS):
    failed = [r for r in runs if r["status"] != "completed"]
    never = sum(1 for r in failed if r["error"] == NEVER_STARTED)
    completed = [r for r in runs if r["status"] == "completed"]
    lines = [f"# Sweep summary: {os.path.abspath(sweep_dir)}", "",
             f"{len(runs)} runs: {len(runs) - len(failed)} completed, {len(failed)} not completed"
             + (f" ({never} never started)" if never else "") + "."
             + (" Vanilla ignores alpha and is shown once."
                if any(r.get("conv") == "vanilla" for r in runs) else ""), "",
             f"Setup: {describe_setup(completed or runs)}.", ""]
    if problems:
        lines += ["## Warnings", ""] + [f"- {p}" for p in problems] + [""]
    with_val = any(g.get("val_accuracy") is not None for g in groups)
    if varying:
        lines += ["Also varying between the runs: " + ", ".join(f"`{k}`" for k in varying)
                  + " (a column each).", ""]
    heads = "".join(f"| {k} " for k in varying)
    lines += ["## By configuration (mean ± std over runs)", "",
              "| conv | alpha | model | expansion | optimizer " + heads
              + "| seeds | runs | test accuracy % | 95 % CI "
              + ("| val accuracy % (best epoch) " if with_val else "")
              + "| train loss | params | MFLOPs/image | train images/s | wall s |",
              "| --- " * (14 + with_val + len(varying)) + "|"]
    for g in groups:
        flops = g["flops_per_image"] / 1e6 if g["flops_per_image"] else None
        val = f"{_pm(g.get('val_accuracy'), g.get('val_accuracy_std'))} | " if with_val else ""
        lines.append(
            f"| {g['conv']} | {_fmt(g['alpha'], 3) or '—'} | {g['model']} | {_fmt(g['expansion'])} | "
            f"{_fmt(g['optimizer'])} | {_settings_cells(g, varying)}{g['n_seeds']} | {g['n']} | "
            f"{_pm(g['test_accuracy'], g['test_accuracy_std'])} | "
            f"{_interval(g['test_accuracy'], g['test_accuracy_ci95'])} | "
            f"{val}"
            f"{_pm(g['train_loss'], g['train_loss_std'], 4)} | {_fmt(g['params'])} | "
            f"{_fmt(flops, 3)} | {_pm(g['train_images_per_second'], g['train_images_per_second_std'], 0)} | "
            f"{_pm(g['wall_seconds'], g['wall_seconds_std'], 1)} |")
    lines += ["", "## Runs", "",
              "| conv | alpha | model " + heads
              + "| seed | test accuracy % | train loss | status | run dir |",
              "| --- " * (8 + len(varying)) + "|"]
    for r in sorted(runs, key=_sort_key):
        lines.append(f"| {r['conv']} | {_fmt(r['alpha'], 3) or '—'} | {r['model']} | "
                     f"{_settings_cells(r, varying)}"
                     f"{_fmt(r['seed'])} | {_fmt(r['test_accuracy'])} | "
                     f"{_fmt(r['train_loss'], 4)} | {r['status']} | `{r['run_dir']}` |")
    if failed:
        lines += ["", "## Not completed", ""]
        for r in sorted(failed, key=_sort_key):
            lines.append(f"- `{r['run_dir']}`: **{r['status']}** — {r['error'] or 'no error recorded'}")
    lines += _plots_section(sweep_dir, groups, formats)
    if os.path.exists(os.path.join(sweep_dir, TEX_FILE)):
        lines += ["", f"LaTeX table (booktabs) of the configurations: [{TEX_FILE}]({TEX_FILE})."]
    return "\n".join(lines) + "\n"


def _plots_section(sweep_dir, groups, formats):
    """Each figure of ``formats`` that is on disk: shown (png, else svg) or linked (pdf),
    its caption under it, its other formats linked."""
    lines = []
    for name in PLOTS:
        files = [f for f in figure_files(formats) if _stem(f) == _stem(name)
                 and os.path.exists(os.path.join(sweep_dir, f))]
        if not files:
            continue
        shown = next((f for ext in SHOWN_FORMATS for f in files if f.endswith("." + ext)), None)
        lines += [""] + ([f"![{_stem(name)}]({shown})"] if shown else [])
        others = [f"[{os.path.splitext(f)[1][1:].upper()}]({f})" for f in files if f != shown]
        lines += [f"*{caption(groups, name)}*" + (f" Also: {', '.join(others)}." if others
                                                   else "")]
    return ["", "## Plots"] + lines if lines else []


def _interval(mean, half, digits=2):
    """The 95 % confidence interval ``[low, high]``, ``—`` for a single run."""
    if mean is None or half is None:
        return "—"
    return f"[{_fmt(mean - half, digits)}, {_fmt(mean + half, digits)}]"


def tex_table(groups, varying=()):
    """summary.tex: a booktabs table of the configurations, test accuracy as mean ± std over
    their runs and its 95 % confidence interval (Student t), MFLOPs and parameters. Columns
    whose value is the same in every row (model, expansion, optimizer) are left out: the
    caption names them."""
    optional = [(k, h) for k, h in (("model", "model"), ("expansion", "expansion"),
                                    ("optimizer", "optimizer"))
                if len({str(g[k]) for g in groups}) > 1]
    # The model is in describe_setup's text already.
    same = [f"{h} {_fmt(groups[0][k])}" for k, h in (("expansion", "expansion"),
                                                     ("optimizer", "optimizer"))
            if groups and (k, h) not in optional and groups[0][k] is not None]
    columns = ([("conv", "l"), (r"$\alpha$", "r")]
               + [(latex.escape(h), "l") for _, h in optional]
               + [(latex.escape(k), "l") for k in varying]
               + [("$n$", "r"), (r"test acc. (\%)", "r"), (r"95\,\% CI", "r"),
                  ("MFLOPs", "r"), ("params", "r")])
    rows = []
    for g in groups:
        flops = g["flops_per_image"] / 1e6 if g["flops_per_image"] else None
        rows.append([latex.escape(g["conv"]),
                     "--" if g["alpha"] is None else f"{g['alpha']:g}"]
                    + [latex.escape(_fmt(g[k])) for k, _ in optional]
                    + ["--" if setting_value(g, k) is None else latex.escape(setting_value(g, k))
                       for k in varying]
                    + [str(g["n"]), latex.mean_std(g["test_accuracy"], g["test_accuracy_std"], 2),
                       latex.interval(g["test_accuracy"], g["test_accuracy_ci95"], 2),
                       latex.number(flops, 2),
                       "--" if g["params"] is None else f"{int(g['params']):,}"])
    counts = [g["test_accuracy_n"] for g in groups]
    text = (f"Test accuracy (%) per configuration: {_error_text(groups, counts) or 'no runs'}, "
            f"95 % confidence interval of the mean (Student t) over n runs. "
            f"{describe_setup(groups)}" + (f"; {', '.join(same)}" if same else "") + ".")
    return latex.table(columns, rows, readable(text))


def _settings_cells(row, varying):
    return "".join(f"{_cell(setting_value(row, k))} | " for k in varying)


def _cell(value):
    if value is None:
        return "—"
    return str(value).replace("|", "\\|")


# ------------------------------------------------------------------------------ figures


def conv_color(conv):
    """The colour of a conv mode, the same in every figure."""
    if conv in CONV_COLORS:
        return CONV_COLORS[conv]
    if conv is None:
        return "tab:gray"
    return OTHER_COLORS[zlib.crc32(str(conv).encode()) % len(OTHER_COLORS)]


def _items(group):
    """The overrides of a group's configuration, conv mode and alpha aside, and the values of
    the config keys that vary between the groups (where the overrides do not name them)."""
    settings = group.get("settings") or {}
    items = [i for i in str(group["config"]).split(",")
             if i and i != "defaults" and not i.startswith("conv=") and not i.startswith("alpha=")
             and i.split("=", 1)[0] not in settings]
    return items + [f"{k}={v}" for k, v in settings.items() if v is not None]


def _series(groups, keep):
    """The groups that ``keep`` accepts as series: ``[(conv, label, style index, rows)]``,
    one per conv mode and whatever else tells the groups apart (alpha aside), rows in alpha
    order. A label names the conv mode, and what else differs where something does."""
    groups = [g for g in groups if keep(g)]
    common = set.intersection(*[set(_items(g)) for g in groups]) if groups else set()
    with_model = len({g["model"] for g in groups}) > 1

    # A column that differs between groups whose overrides do not say so (runs of presets)
    shown = [k for k in ("optimizer", "expansion") if len({str(g[k]) for g in groups}) > 1]

    def rest(g):
        items = [i for i in _items(g) if i not in common]
        named = [f"{k}={_fmt(g[k])}" for k in shown
                 if not any(i.startswith(k + "=") for i in items)]
        return ",".join(([f"model={g['model']}"] if with_model else []) + named + items)

    rests = sorted({rest(g) for g in groups})
    series = OrderedDict()
    for g in sorted(groups, key=lambda g: (CONV_ORDER.get(g["conv"], 99), str(g["conv"]),
                                           rest(g), g["alpha"] or 0)):
        series.setdefault((g["conv"], rest(g)), []).append(g)
    return [(conv, str(conv) + (f" ({r})" if r else ""), rests.index(r), rows)
            for (conv, r), rows in series.items()]


def _new_figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(6.4, 4.6))
    return fig, fig.subplots()


def _gid(kind, conv, style):
    """An id for a figure's artist (an SVG element's id): what it is, of which series."""
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]', '_', str(conv))}-{style}"


def _error_text(groups, counts):
    """What the error bars of ``groups`` show (the legend's title and the caption's end)."""
    repeated = any(g.get("n_seeds", g["n"]) < g["n"] for g in groups if "n" in g)
    return seeds_text(counts, "runs" if repeated else "seeds")


def _finish(fig, ax, title, groups, counts, points=()):
    """Title, grid, legend and layout; then ``points`` (``[(x, y, text, colour)]``)
    labelled, kept apart from each other, the points and the legend."""
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title=_error_text(groups, counts) or None, fontsize=8, title_fontsize=8)
    fig.tight_layout()
    if points:
        place_labels(ax, list(points))
    return fig


#: Each figure's title: short, as in a paper (the setup goes into its caption).
FIGURE_TITLES = OrderedDict([
    (PLOTS[0], "Test accuracy vs alpha"), (PLOTS[1], "Training throughput vs alpha"),
    (PLOTS[2], "Accuracy vs compute"), (PLOTS[3], "Accuracy vs throughput")])


def _on_alpha_axis(metric):
    return lambda g: g[metric] is not None and (g["conv"] == "vanilla" or g["alpha"] is not None)


def _with_accuracy(x_metric):
    return lambda g: bool(g[x_metric]) and g["test_accuracy"] is not None


#: file name -> (the configurations it shows, the metric whose runs its error bars count).
FIGURE_CONTENT = OrderedDict([
    (PLOTS[0], (_on_alpha_axis("test_accuracy"), "test_accuracy")),
    (PLOTS[1], (_on_alpha_axis("train_images_per_second"), "train_images_per_second")),
    (PLOTS[2], (_with_accuracy("flops_per_image"), "test_accuracy")),
    (PLOTS[3], (_with_accuracy("train_images_per_second"), "test_accuracy"))])


def caption(groups, name):
    """The caption of figure ``name`` (summary.md's line under it): what it shows, the data
    set, model and epochs of its points, and what its error bars are. The figure's own
    title stays short, as a paper's figure has it."""
    keep, metric = FIGURE_CONTENT[name]
    shown = [g for g in groups if keep(g)]
    errors = _error_text(shown or groups, [g[metric + "_n"] for g in shown])
    band = " and vanilla's band" if name in PLOTS[:2] and any(
        g["conv"] == "vanilla" and g.get(metric + "_std") for g in shown) else ""
    return (f"{FIGURE_TITLES[name]}. {describe_setup(shown or groups)}."
            + (f" Error bars{band}: {errors}." if errors else ""))


def alpha_figure(groups, metric, ylabel, title, digits=2):
    """``metric`` against alpha: a line with error bars per conv mode (and per setting that
    tells groups of a conv mode apart), vanilla as a horizontal baseline with a band; every
    point labelled with its value."""
    fig, ax = _new_figure()
    series = _series(groups, _on_alpha_axis(metric))
    plotted, points, baselines = [], [], []
    for conv, label, style, rows in series:
        color = conv_color(conv)
        plotted += rows
        if conv == "vanilla":
            for i, r in enumerate(rows):
                line = ax.axhline(r[metric], color=color, linestyle=VANILLA_LINESTYLES[style % 4],
                                  label=label if i == 0 else None)
                line.set_gid(_gid("series", conv, style))
                if r[metric + "_std"]:
                    band = ax.axhspan(r[metric] - r[metric + "_std"],
                                      r[metric] + r[metric + "_std"], color=color, alpha=0.1,
                                      label=f"{label} ± std" if i == 0 else None)
                    band.set_gid(_gid("band", conv, style))
                baselines.append((r[metric], f"{label} {r[metric]:.{digits}f}", color))
            continue
        stds = [r[metric + "_std"] or 0 for r in rows]
        bars = ax.errorbar([r["alpha"] for r in rows], [r[metric] for r in rows],
                           yerr=stds if any(stds) else None, marker=MARKERS[style % len(MARKERS)],
                           linestyle=LINESTYLES[style % len(LINESTYLES)], capsize=3, color=color,
                           label=label)
        bars.lines[0].set_gid(_gid("series", conv, style))
        points += [(r["alpha"], r[metric], f"{r[metric]:.{digits}f}", color) for r in rows]
    alphas = sorted({g["alpha"] for g in plotted if g["alpha"] is not None})
    ax.set_xlabel("alpha (share of low-frequency channels)")
    ax.set_ylabel(ylabel)
    if alphas:
        ax.set_xticks(alphas)
    # A baseline's label sits at its right end (it has no point of its own).
    right = ax.get_xlim()[1]
    points += [(right, value, text, color) for value, text, color in baselines]
    return _finish(fig, ax, title, plotted or groups, [g[metric + "_n"] for g in plotted],
                   points)


def group_value(group, name):
    """A configuration's value of a search objective (``accuracy``: its validation accuracy
    when it has one, else its test accuracy), or None."""
    return value(group, name)  # a group holds the metrics' names, as means over its seeds


def front(groups, objectives):
    """The configurations on the Pareto front of ``objectives`` (those with every value)."""
    scored = [g for g in groups if all(group_value(g, o) is not None for o in objectives)]
    points = [[group_value(g, o) for o in objectives] for g in scored]
    return [scored[i] for i in pareto_front(points, directions(objectives))]


def mark_front(ax, groups, objectives, x_of, y_of):
    """Ring the configurations on the front of ``objectives`` and join them."""
    # One ring per point: configurations that tie (octave and multi-octave compute the same
    # numbers) share it.
    points = sorted({(x_of(g), y_of(g)) for g in front(groups, objectives)})
    if not points:
        return

    arrows = {"maximize": "↑", "minimize": "↓"}
    label = "Pareto front (" + ", ".join(f"{o} {arrows[OBJECTIVES[o]]}" for o in objectives) + ")"
    ax.plot([x for x, _ in points], [y for _, y in points], linestyle=":",
            color="grey", marker="o", markersize=13, markerfacecolor="none",
            markeredgecolor="black", label=label, zorder=1)


def sweep_objectives(sweep_dir, runs):
    """The sweep's search.objectives (its first run's .hydra/config.yaml; the default when
    no run says)."""
    for row in runs:
        path = os.path.join(sweep_dir, row["run_dir"], ".hydra", "config.yaml")
        try:
            with open(path) as f:
                found = ((yaml.safe_load(f) or {}).get("search") or {}).get("objectives")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if isinstance(found, list) and found and all(str(o) in OBJECTIVES for o in found):
            return tuple(str(o) for o in found)
    return DEFAULT_OBJECTIVES


def pareto_rows(groups, objectives):
    """pareto.csv's rows: the front's configurations, best first in the first objective."""
    sign = -1 if OBJECTIVES[objectives[0]] == "maximize" else 1
    rows = []
    for g in front(groups, objectives):
        row = {k: g.get(k) for k in ("conv", "model", "alpha", "expansion", "optimizer", "n",
                                     "seeds", "test_accuracy", "config")}
        row.update(g.get("settings") or {})
        row.update({o: group_value(g, o) for o in objectives})
        rows.append(row)
    return sorted(rows, key=lambda r: sign * r[objectives[0]])


def _point_label(group):
    return "vanilla" if group["conv"] == "vanilla" or group["alpha"] is None else \
        f"α={group['alpha']:g}"


def scatter_figure(groups, x_metric, x_scale, xlabel, title, objectives, x_errors=False):
    """Test accuracy against ``x_metric`` (divided by ``x_scale``), a point per group, each
    labelled (its alpha, or vanilla); the Pareto front of ``objectives`` ringed."""
    fig, ax = _new_figure()
    series = _series(groups, _with_accuracy(x_metric))
    plotted, points = [], []
    for conv, label, style, rows in series:
        plotted += rows
        color = conv_color(conv)
        xs = [r[x_metric] / x_scale for r in rows]
        stds = [r["test_accuracy_std"] or 0 for r in rows]
        xstds = [(r[x_metric + "_std"] or 0) / x_scale for r in rows] if x_errors else []
        bars = ax.errorbar(xs, [r["test_accuracy"] for r in rows],
                           xerr=xstds if any(xstds) else None,
                           yerr=stds if any(stds) else None, marker=MARKERS[style % len(MARKERS)],
                           capsize=3, color=color, label=label,
                           linestyle="none" if conv == "vanilla"
                           else LINESTYLES[style % len(LINESTYLES)])
        bars.lines[0].set_gid(_gid("series", conv, style))
        points += [(x, r["test_accuracy"], _point_label(r), color) for x, r in zip(xs, rows)]
    mark_front(ax, plotted, objectives, lambda g: g[x_metric] / x_scale,
               lambda g: g["test_accuracy"])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    return _finish(fig, ax, title, plotted or groups, [g["test_accuracy_n"] for g in plotted],
                   points)


def compute_figure(groups):
    """Test accuracy against MFLOPs per image; the Pareto front of accuracy and FLOPs ringed."""
    return scatter_figure(groups, "flops_per_image", 1e6, "MFLOPs per image",
                          FIGURE_TITLES[PLOTS[2]], ("accuracy", "flops_per_image"))


def throughput_figure(groups):
    """Test accuracy against training images/s; the Pareto front of accuracy and throughput
    ringed."""
    return scatter_figure(groups, "train_images_per_second", 1, "training images / s",
                          FIGURE_TITLES[PLOTS[3]], ("accuracy", "train_images_per_second"),
                          x_errors=True)


def figures(groups):
    """The four figures (matplotlib Figures), by file name (.png; the other formats of
    report.format are the same figures)."""
    return OrderedDict([
        (PLOTS[0], alpha_figure(groups, "test_accuracy", "test accuracy (%)",
                                FIGURE_TITLES[PLOTS[0]])),
        (PLOTS[1], alpha_figure(groups, "train_images_per_second", "training images / s",
                                FIGURE_TITLES[PLOTS[1]], digits=0)),
        (PLOTS[2], compute_figure(groups)),
        (PLOTS[3], throughput_figure(groups)),
    ])


def figure_files(formats):
    """The figures' file names in ``formats``, figure by figure."""
    return [_stem(p) + "." + f for p in PLOTS for f in formats]


def _stem(name):
    return os.path.splitext(name)[0]


def plot(sweep_dir, groups, formats=DEFAULT_FORMATS, dpi=DEFAULT_DPI):
    """The figures, a file per format of ``formats`` in the sweep dir; returns the paths
    written."""
    try:
        import matplotlib  # noqa: F401  (deferred: slow to import, and only the plots need it)
    except ImportError:
        sys.stderr.write("warning: matplotlib is not installed: no plots (pip install matplotlib)\n")
        return []
    written = []
    for name, fig in figures(groups).items():
        written += save_figure(fig, os.path.join(sweep_dir, _stem(name)), formats, dpi)
    return written


# ------------------------------------------------------------------------------ the report


def build_report(sweep_dir, make_plots=True, formats=None, dpi=None,
                 setting_keys=("--format", "--dpi")):
    """Write summary.csv, summary_by_config.csv, summary.md, summary.tex and the plots (in
    ``formats`` at ``dpi``; None: as the sweep's report.format/report.dpi say; a bad value
    is a ConfigError naming ``setting_keys``); returns the runs."""
    if not os.path.isdir(sweep_dir):
        raise ReportError(f"{sweep_dir} is not a directory")
    problems = []
    runs = sorted(find_runs(sweep_dir, problems), key=_sort_key)
    if not runs:
        raise ReportError(f"no run directories (with .hydra/ or metrics.json) under {sweep_dir}")
    # A bad format is refused before anything is written.
    formats, dpi = sweep_report_settings(sweep_dir, runs, formats, dpi, setting_keys)
    varying = varying_keys(runs)
    groups = aggregate(runs, varying)
    # The varying config keys: a column each, after the columns every report has.
    write_csv(os.path.join(sweep_dir, "summary.csv"), _with_settings(runs, varying),
              list(RUN_COLUMNS) + varying)
    agg_columns = list(AGG_COLUMNS_HEAD) + [c for m in AGG_METRICS
                                            for c in (m, m + "_std", m + "_ci95")] \
        + ["config"] + varying
    write_csv(os.path.join(sweep_dir, "summary_by_config.csv"), _with_settings(groups, varying),
              agg_columns)
    objectives = sweep_objectives(sweep_dir, runs)
    write_csv(os.path.join(sweep_dir, PARETO_FILE), pareto_rows(groups, objectives),
              ["conv", "model", "alpha", "expansion", "optimizer", "n", "seeds", *objectives]
              + (["test_accuracy"] if "test_accuracy" not in objectives else []) + ["config"]
              + varying)
    if groups:
        write_text_atomic(os.path.join(sweep_dir, TEX_FILE), tex_table(groups, varying))
    if make_plots and groups:
        plot(sweep_dir, groups, formats, dpi)
    write_text_atomic(os.path.join(sweep_dir, "summary.md"),
                      readable(markdown(sweep_dir, runs, groups, problems, varying, formats)))
    return runs


def sweep_report_settings(sweep_dir, runs, formats=None, dpi=None,
                          keys=("--format", "--dpi")):
    """The figures' formats and dpi: those given, else the sweep's report.format and
    report.dpi (its first run's .hydra/config.yaml that has them), else the defaults. A bad
    value given raises ConfigError; one in a run's config is a warning and the default."""
    if formats is not None and dpi is not None:
        return report_settings(formats, dpi, keys)
    saved = {}
    for row in runs:
        path = os.path.join(sweep_dir, row["run_dir"], ".hydra", "config.yaml")
        try:
            with open(path) as f:
                found = (yaml.safe_load(f) or {}).get("report")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if isinstance(found, dict):
            saved = found
            break

    try:
        saved_formats, saved_dpi = report_settings(saved.get("format", list(DEFAULT_FORMATS)),
                                                   saved.get("dpi", DEFAULT_DPI))
    except ConfigError as exc:
        sys.stderr.write(readable(f"warning: the sweep's {exc}; the report uses "
                                  f"{','.join(DEFAULT_FORMATS)} at {DEFAULT_DPI} dpi\n"))
        saved_formats, saved_dpi = DEFAULT_FORMATS, DEFAULT_DPI
    return report_settings(saved_formats if formats is None else formats,
                           saved_dpi if dpi is None else dpi, keys)


def _with_settings(rows, varying):
    """Rows with each varying config key's value as a field of its own (for the CSV files)."""
    return [dict(r, **{k: setting_value(r, k) for k in varying}) for r in rows]


def failure_line(sweep_dir, runs):
    failed = [r for r in runs if r["status"] != "completed"]
    if not failed:
        return None
    never = sum(1 for r in failed if r["error"] == NEVER_STARTED)
    first = failed[0]
    return readable(f"{len(failed)} of {len(runs)} runs did not complete"
                    + (f", {never} of them never started" if never else "")
                    + f" (see {os.path.join(sweep_dir, 'summary.md')}); first: "
                    f"{first['run_dir']}: {first['status']}: {first['error']}")


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


def track_sweep(config, sweep_dir):
    """With logger=mlflow: the report's files as an MLflow run of the sweep's experiment (a
    tracking store that fails here is a warning: the report itself is written)."""
    formats = OmegaConf.select(config, "report.format", default=None)
    try:
        formats = report_settings(OmegaConf.to_object(formats) if OmegaConf.is_config(formats)
                                  else formats, DEFAULT_DPI)[0]
    except UserError:  # a config from before report.format: whatever figures are there
        formats = REPORT_FORMATS
    names = ["summary.md", "summary.csv", "summary_by_config.csv", PARETO_FILE, TEX_FILE,
             *figure_files(formats)]
    try:
        log_sweep(config, sweep_dir, [os.path.join(sweep_dir, n) for n in names])
    except (UserError, Exception) as exc:  # noqa: BLE001 - the report is on disk already
        sys.stderr.write(f"warning: sweep report not logged to MLflow: {exc}\n")


class SweepReport(Callback):
    """Hydra callback: the report when a multirun ends, and a non-zero exit if a run failed."""

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = str(config.hydra.sweep.dir)

        try:
            formats = OmegaConf.select(config, "report.format", default=None)
            formats = OmegaConf.to_object(formats) if OmegaConf.is_config(formats) else formats
            dpi = OmegaConf.select(config, "report.dpi", default=None)
            runs = build_report(sweep_dir, formats=formats, dpi=dpi,
                                setting_keys=("report.format", "report.dpi"))
        except ReportError as exc:
            sys.stderr.write(f"error: sweep report: {exc}\n")
            interrupted_sweep_line(config, sweep_dir)
            sys.exit(1)
        except (OSError, UserError) as exc:
            # Hydra turns a callback's exception into a warning and exits 0: a sweep whose
            # report could not be written (summary.md a folder, a full disk) must not look done.
            if isinstance(exc, OSError) and not isinstance(exc, UserError):
                exc = OutputError(exc.filename or sweep_dir, exc)
            sys.stderr.write(f"error: sweep report: {exc}\n")
            sys.exit(USER_ERROR_EXIT)
        print(readable(f"Sweep summary: {os.path.join(sweep_dir, 'summary.md')}"))
        track_sweep(config, sweep_dir)
        line = failure_line(sweep_dir, runs)
        if line:
            sys.stderr.write(f"error: {line}\n")
            interrupted_sweep_line(config, sweep_dir)
            sys.exit(1)


def interrupted_sweep_line(config, sweep_dir):
    """After a sweep that SIGINT/SIGTERM stopped: its last line is the command that continues
    the whole sweep (every job's own line above names that job's checkpoint only)."""
    signum = PROCESS.sweep_stop.signal
    if signum is None:
        return

    search = "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower()
    hint = sweep_resume_hint(sys.argv[1:], sweep_dir, search=search)
    sys.stderr.write(f"error: the sweep was interrupted by "
                     f"{signal.Signals(signum).name}; continue it with: {hint}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m octconv_exp.report",
        description="(Re)build summary.csv, summary.md and plots of a sweep directory.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--format", metavar="FORMATS",
                        help="figure formats, comma-separated: some of "
                        + ", ".join(REPORT_FORMATS) + " (default: the sweep's report.format, "
                        "else " + ",".join(DEFAULT_FORMATS) + ")")
    parser.add_argument("--dpi", metavar="N",
                        help="PNG resolution (default: the sweep's report.dpi, else "
                        f"{DEFAULT_DPI})")
    args = parser.parse_args(argv)

    try:
        dpi = args.dpi
        if dpi is not None:
            dpi = int(dpi) if dpi.strip().isdigit() else dpi
        runs = build_report(args.sweep_dir, make_plots=not args.no_plots, formats=args.format,
                            dpi=dpi)
    except (ReportError, OSError, UserError) as exc:  # summary.md a folder, a full disk
        if isinstance(exc, OSError) and not isinstance(exc, UserError):
            exc = OutputError(exc.filename or args.sweep_dir, exc)
        sys.stderr.write(readable(f"error: {exc}\n"))
        return 2
    print(readable(f"{len(runs)} runs; summary: {os.path.join(args.sweep_dir, 'summary.md')}"))
    line = failure_line(args.sweep_dir, runs)
    if line:
        sys.stderr.write(f"warning: {line}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
