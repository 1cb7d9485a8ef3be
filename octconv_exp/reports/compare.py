"""Runs side by side: the config keys that differ, the final metrics, the learning curves.

    python -m octconv_exp.compare RUN_OR_SWEEP_DIR [RUN_OR_SWEEP_DIR ...] [--out PATH]

A sweep dir stands for every run dir under it. Prints the config keys whose values differ
between the runs (from each run's ``.hydra/config.yaml``) and the final metrics of each
(``metrics.json``), and writes the same as ``compare.csv`` and ``compare.md`` with one figure of
the learning curves of every run's ``epochs.csv`` (``compare.png`` and ``compare.pdf``) into
``--out`` (a folder, by default the current one; a name ending in ``.png`` names the figure, the
other files take its stem). A run still being written (its dir's lock held by a live process) is
shown as ``running`` with the epochs it has finished. Every file is read as data: YAML with the
safe loader, nothing a file names is imported. A path that is no run dir or sweep dir, a named
run without ``metrics.json``, or a file that cannot be parsed ends in one line and exit 2.
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys

import yaml

from ..errors import USER_ERROR_EXIT, UserError
from ..records.outputs import EPOCHS_FILE, METRICS_FILE, OutputError, atomic_write, write_text_atomic
from ..training.rundir import live_holder
from .report import readable, run_settings

CONFIG_FILE = os.path.join(".hydra", "config.yaml")
#: Folders under a sweep dir that never hold a job's run dir.
NOT_RUN_FOLDERS = (".hydra", ".submitit", "tensorboard", "checkpoints")
#: The metrics shown first, in this order, where any run has them.
HEADLINE_METRICS = ("status", "epochs_completed", "test_accuracy", "test_loss",
                    "val_accuracy", "val_loss", "train_loss", "train_accuracy", "best_epoch",
                    "test_epoch", "params", "flops_per_image", "train_images_per_second",
                    "wall_seconds")
#: Other numeric fields of metrics.json that are final metrics by their name (``test_top5``,
#: per-class or per-split accuracies and losses a newer run records), shown after the headline
#: ones: a word of the name (split at "_") matches.
METRIC_WORD = re.compile(r"accuracy|loss|top\d+")
FIGURE_SIZE_IN = (11.0, 4.2)
FIGURE_DPI = 100
FIGURE_NAME = "compare.png"


class Run:
    """One run dir as read from disk."""

    def __init__(self, path, metrics, status, settings, derived, epochs):
        self.path = path
        self.label = os.path.basename(os.path.abspath(path))
        self.metrics = metrics  # metrics.json, {} while the run has not written it
        self.status = status
        self.settings = settings  # the flat config (None: no .hydra/config.yaml)
        self.derived = derived  # the config keys that are interpolations
        self.epochs = epochs  # epochs.csv rows, {column: float or None}


# ------------------------------------------------------------------------------ reading


def is_run_dir(path):
    return os.path.isdir(os.path.join(path, ".hydra")) or \
        os.path.isfile(os.path.join(path, METRICS_FILE))


def sweep_run_dirs(sweep_dir):
    """The run dirs under ``sweep_dir``, in path order."""
    found = []
    for root, dirs, _ in os.walk(sweep_dir):
        dirs[:] = sorted(d for d in dirs if d not in NOT_RUN_FOLDERS)
        if root != sweep_dir and is_run_dir(root):
            found.append(root)
            dirs[:] = []  # a run dir's subfolders are its own files
    return found


def expand(paths):
    """``[(run dir, named)]``: each path that is a run dir (named), or the run dirs of each
    path that is a sweep dir; a run reached twice counts once."""
    out, seen = [], set()
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"{path}: no such directory (give run dirs or sweep dirs)")
        if is_run_dir(path):
            found = [(path, True)]
        else:
            found = [(d, False) for d in sweep_run_dirs(path)]
            if not found:
                raise UserError(f"{path}: not a run dir (no .hydra/ or {METRICS_FILE}) and no "
                                "run dirs under it")
        for run_dir, named in found:
            key = os.path.realpath(run_dir)
            if key not in seen:
                seen.add(key)
                out.append((run_dir, named))
    return out


def read_metrics(run_dir, named):
    """``(metrics, status)``. A run whose lock a live process holds is ``running``; a job of a
    sweep without metrics.json (killed) is ``missing``; a named run without it is an error."""
    path = os.path.join(run_dir, METRICS_FILE)
    try:
        running = live_holder(run_dir) is not None
    except (TypeError, ValueError):  # a lock file whose pid is no number: no live run to name
        running = False
    if not os.path.exists(path):
        if running:
            return {}, "running"
        if named:
            raise UserError(f"{run_dir}: no {METRICS_FILE} (the run was killed before writing "
                            "it, or never started)")
        return {}, "missing"
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable as JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: a JSON {type(metrics).__name__}, not an object")
    status = str(metrics.get("status", "unknown"))
    if running:  # resumed or re-evaluated right now: its record is the previous attempt's
        status = f"running (record so far: {status})"
    return metrics, status


def read_settings(run_dir):
    """The run's config, flat, and its interpolated keys; ``(None, set())`` without one."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None, set()
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not readable as YAML: {' '.join(str(exc).split())[:200]}") \
            from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a YAML {type(loaded).__name__}, not a mapping of config keys")
    return run_settings(path)


def _float(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_epochs(run_dir):
    """epochs.csv's rows with every cell a float (None where empty or not a number); [] when
    the run has not finished an epoch yet."""
    path = os.path.join(run_dir, EPOCHS_FILE)
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as exc:
        raise UserError(f"{path}: not readable as CSV: {' '.join(str(exc).split())}") from None
    epochs = [{k: _float(v) for k, v in row.items() if k is not None} for row in rows]
    return [e for e in epochs if e.get("epoch") is not None]


def load_runs(paths):
    runs = []
    for run_dir, named in expand(paths):
        metrics, status = read_metrics(run_dir, named)
        settings, derived = read_settings(run_dir)
        runs.append(Run(run_dir, metrics, status, settings, derived, read_epochs(run_dir)))
    if len(runs) < 2:
        raise UserError(f"{len(runs)} run dir found in {' '.join(paths)}: give two or more runs "
                        "(or a sweep dir holding them)")
    for run, label in zip(runs, unique_labels([r.path for r in runs])):
        run.label = label
    return runs


def unique_labels(paths):
    """Each path's shortest tail of folder names that no other path ends in (``a``, ``b``;
    a sweep's jobs ``conv=octave/seed=0``)."""
    parts = [os.path.abspath(p).strip(os.sep).split(os.sep) for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1
                    and depth[i] < len(parts[i])]
        if not clashing:
            return labels
        for i in clashing:
            depth[i] += 1


# ------------------------------------------------------------------------------ comparing

_ABSENT = object()


def _comparable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def differing_keys(runs):
    """The config keys whose values differ between the runs that have a config (a key one run
    lacks differs). A key that every run sets by interpolation (``scheduler.T_max:
    ${trainer.epochs}``) follows what it names, which is listed if it differs."""
    configured = [r for r in runs if r.settings is not None]
    keys = sorted({k for r in configured for k in r.settings})
    differ = []
    for key in keys:
        having = [r for r in configured if key in r.settings]
        if having and all(key in r.derived for r in having):
            continue
        values = {_comparable(r.settings.get(key, _ABSENT)) for r in configured}
        if len(values) > 1:
            differ.append(key)
    return differ


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_keys(runs):
    """The metrics.json fields shown: the headline ones any run has, other numeric fields named
    like a metric, then the code version and package versions where the runs differ in them."""
    present = {k for r in runs for k, v in r.metrics.items() if v is not None}
    keys = ["status"] + [k for k in HEADLINE_METRICS[1:] if k in present]
    keys += sorted(k for k in present if k not in keys and any(
        METRIC_WORD.fullmatch(word) for word in k.split("_")) and any(
        _is_number(r.metrics.get(k)) for r in runs))
    for group in ("code_version", "versions"):
        names = sorted({n for r in runs if isinstance(r.metrics.get(group), dict)
                        for n in r.metrics[group]})
        for name in names:
            values = {_comparable(metric_value(r, f"{group}.{name}")) for r in runs}
            if group == "code_version" or len(values) > 1:
                keys.append(f"{group}.{name}")
    return keys


def metric_value(run, key):
    if key == "status":
        return run.status
    if "." in key:
        group, name = key.split(".", 1)
        node = run.metrics.get(group)
        return node.get(name) if isinstance(node, dict) else None
    return run.metrics.get(key)


def table_rows(runs):
    """``[(section, key, [value per run])]``: the differing config keys, then the metrics.
    A config key a run lacks is None there."""
    rows = [("config", k, [None if r.settings is None else r.settings.get(k) for r in runs])
            for k in differing_keys(runs)]
    rows += [("metrics", k, [metric_value(r, k) for r in runs]) for k in metric_keys(runs)]
    return rows


#: Shown shortened in the printed and markdown tables, as `git log --oneline` does.
SHORT_COMMIT = 12


def text_cell(value, key=None):
    """A value as the printed and markdown tables show it (the CSV holds it exactly)."""
    if key == "code_version.commit" and isinstance(value, str):
        return value[:SHORT_COMMIT]
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # exact: repr of floats, true/false, lists


def aligned(header, rows):
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [header] + rows]


def text_report(runs, rows, written):
    labels = [r.label for r in runs]
    lines = ["Runs:"] + [f"  {r.label}: {r.path}" for r in runs]
    config = [(k, v) for s, k, v in rows if s == "config"]
    without = [r.label for r in runs if r.settings is None]
    lines += ["", f"Config keys that differ ({len(config)}):" if config
              else "Config keys that differ: none"]
    if config:
        lines += ["  " + line for line in aligned(["key"] + labels,
                                                  [[k] + [text_cell(x) for x in v]
                                                   for k, v in config])]
    if without:
        lines.append(f"  (no {CONFIG_FILE}, not compared: {', '.join(without)})")
    lines += ["", f"Final metrics ({METRICS_FILE}):"]
    lines += ["  " + line for line in aligned(
        ["metric"] + labels, [[k] + [text_cell(x, k) for x in v] for s, k, v in rows
                              if s == "metrics"])]
    if written:
        lines += ["", "Written: " + ", ".join(written)]
    return "\n".join(lines) + "\n"


def markdown(runs, rows, figure_name):
    def escape(text):
        return str(text).replace("|", "\\|")

    labels = [escape(r.label) for r in runs]
    out = ["# Comparison of runs", ""] + [f"- `{r.label}`: `{os.path.abspath(r.path)}`"
                                          for r in runs]
    for section, title in (("config", "Config keys that differ"),
                           ("metrics", f"Final metrics ({METRICS_FILE})")):
        chosen = [(k, v) for s, k, v in rows if s == section]
        out += ["", f"## {title}", ""]
        if not chosen:
            out.append("None.")
            continue
        out += ["| key | " + " | ".join(labels) + " |", "| --- " * (len(labels) + 1) + "|"]
        out += [f"| `{k}` | " + " | ".join(escape(text_cell(x, k)) for x in v) + " |"
                for k, v in chosen]
    if figure_name:
        out += ["", "## Learning curves", "", f"![learning curves]({figure_name})"]
    return "\n".join(out) + "\n"


def write_csv(path, runs, rows):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["section", "key"] + [r.label for r in runs])
    for section, key, values in rows:
        writer.writerow([section, key] + [csv_cell(v) for v in values])
    write_text_atomic(path, readable(buf.getvalue()))


# ------------------------------------------------------------------------------ the figure


def _colors(n):
    from matplotlib import colormaps  # deferred: matplotlib is slow to import and only the plots need it

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _series(run, column):
    points = [(e["epoch"], e.get(column)) for e in run.epochs if e.get(column) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def curves_figure(runs):
    """Training loss (validation loss dashed) and validation accuracy (training accuracy
    dotted) per epoch of every run, one colour each, the test accuracy a star at the epoch whose
    weights it scored."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.lines import Line2D  # deferred: matplotlib is slow to import and only the plots need it

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    has_val_loss = has_val_acc = has_train_acc = has_test = False
    for run, color in zip(runs, _colors(len(runs))):
        state = run.status.split(" (")[0]  # "running", not what its previous record said
        label = run.label if state == "completed" else f"{run.label} ({state})"
        x, y = _series(run, "train_loss")
        loss_ax.plot(x, y, "-o", color=color, markersize=3, label=label)
        x, y = _series(run, "val_loss")
        if x:
            has_val_loss = True
            loss_ax.plot(x, y, "--", color=color)
        x, y = _series(run, "val_accuracy")
        if x:
            has_val_acc = True
            acc_ax.plot(x, y, "-o", color=color, markersize=3)
        x, y = _series(run, "train_accuracy")
        if x:
            has_train_acc = True
            acc_ax.plot(x, y, ":", color=color, linewidth=1)
        test = run.metrics.get("test_accuracy")
        if _is_number(test):
            has_test = True
            at = run.metrics.get("test_epoch")
            if not _is_number(at):
                at = run.epochs[-1]["epoch"] if run.epochs else 0
            acc_ax.plot([at], [test], "*", color=color, markersize=12,
                        markeredgecolor="black", markeredgewidth=0.5)
    loss_ax.set_title("training loss" + (" (validation loss dashed)" if has_val_loss else ""),
                      fontsize=10)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    acc_ax.set_title("accuracy %", fontsize=10)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy %")
    kinds = ([Line2D([], [], color="grey", marker="o", markersize=3, label="validation")]
             if has_val_acc else []) + \
        ([Line2D([], [], color="grey", linestyle=":", label="training")] if has_train_acc
         else []) + \
        ([Line2D([], [], color="grey", marker="*", linestyle="", markersize=10,
                 label="test (epoch of its weights)")] if has_test else [])
    if kinds:
        acc_ax.legend(handles=kinds, fontsize=8)
    else:
        acc_ax.text(0.5, 0.5, "no accuracy recorded", ha="center",
                    va="center", transform=acc_ax.transAxes, fontsize=9, color="grey")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize=8)
    else:
        loss_ax.text(0.5, 0.5, f"no {EPOCHS_FILE} rows yet", ha="center", va="center",
                     transform=loss_ax.transAxes, fontsize=9, color="grey")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ the command


def output_paths(out):
    """``{"png", "pdf", "csv", "md"}`` paths for ``--out`` (a folder, made if missing, or a
    figure file name ending in .png)."""
    if out.lower().endswith(".png"):
        folder, stem = os.path.dirname(out) or ".", os.path.basename(out)[:-4]
    else:
        folder, stem = out, FIGURE_NAME[:-4]
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, exc) from None
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: {folder} is not a folder")
    return {ext: os.path.join(folder, f"{stem}.{ext}") for ext in ("png", "pdf", "csv", "md")}


def compare(paths, out=".", make_figure=True):
    """Read the runs, write the files; returns (runs, table rows, paths written)."""
    runs = load_runs(paths)
    rows = table_rows(runs)
    files = output_paths(out)
    written = []
    figure_name = None
    if make_figure:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.stderr.write("warning: matplotlib is not installed: no figure "
                             "(pip install matplotlib)\n")
        else:
            fig = curves_figure(runs)
            for ext in ("png", "pdf"):
                atomic_write(files[ext], lambda f, ext=ext: fig.savefig(f, format=ext,
                                                                         dpi=FIGURE_DPI))
                written.append(files[ext])
            figure_name = os.path.basename(files["png"])
    write_csv(files["csv"], runs, rows)
    write_text_atomic(files["md"], readable(markdown(runs, rows, figure_name)))
    written += [files["csv"], files["md"]]
    return runs, rows, written


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m octconv_exp.compare",
        description="Compare runs: the config keys that differ, the final metrics side by "
                    "side, and the learning curves on one figure.")
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                        help="run dirs, or sweep dirs (each stands for the run dirs under it)")
    parser.add_argument("--out", default=".",
                        help="folder for compare.png/.pdf/.csv/.md (default: the current one), "
                             "or the figure's file name ending in .png (the others take its stem)")
    parser.add_argument("--no-figure", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    try:
        runs, rows, written = compare(args.paths, args.out, make_figure=not args.no_figure)
    except UserError as exc:
        sys.stderr.write(readable(f"error: {exc}\n"))
        return USER_ERROR_EXIT
    except OSError as exc:  # a folder in the way of a file, a full disk
        sys.stderr.write(readable(f"error: {OutputError(exc.filename or args.out, exc)}\n"))
        return USER_ERROR_EXIT
    sys.stdout.write(readable(text_report(runs, rows, written)))
    return 0
