"""Sweep reports: summary.csv, summary.md and plots, from the run directories on disk.

Used at the end of every multirun (the ``SweepReport`` Hydra callback) and on its own:

    python -m octconv_exp.report SWEEP_DIR

which also works after a sweep that ran on a cluster or was interrupted. Runs repeated with
several seeds are aggregated to mean and standard deviation per configuration. Vanilla runs
ignore alpha: they appear once, without an alpha, and as a horizontal baseline in the plots.
"""
import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections import OrderedDict

import yaml

from .outputs import METRICS_FILE, write_text_atomic
from .sweep import SEED_KEY, config_name, split_override

CONV_ORDER = {"vanilla": 0, "octave": 1, "multi-octave": 2}
RUN_COLUMNS = ("conv", "alpha", "expansion", "optimizer", "seed", "test_accuracy", "train_loss",
               "params", "flops_per_image", "train_images_per_second", "wall_seconds", "status",
               "error", "config", "run_dir")
AGG_METRICS = ("test_accuracy", "train_loss", "train_images_per_second", "wall_seconds")
PLOTS = ("accuracy_vs_alpha.png", "throughput_vs_alpha.png", "accuracy_vs_flops.png")


class ReportError(Exception):
    pass


def find_runs(sweep_dir):
    """Every run dir (one holding .hydra/ or metrics.json) under ``sweep_dir``, with its
    metrics (status 'missing' when a job never wrote them, e.g. killed) and overrides."""
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
            metrics = {"status": "missing", "error": "no metrics.json (killed or still running?)"}
        if problem and metrics.get("status") == "completed":
            metrics = dict(metrics, status="unreadable", error=problem)
        runs.append(_row(root, sweep_dir, metrics, overrides))
    return runs


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
    row = {
        "conv": conv, "alpha": None if conv == "vanilla" else alpha,
        "expansion": m.get("expansion"), "optimizer": m.get("optimizer"), "seed": seed,
        "test_accuracy": _number(m.get("test_accuracy")), "train_loss": _number(m.get("train_loss")),
        "params": _number(m.get("params")), "flops_per_image": _number(m.get("flops_per_image")),
        "train_images_per_second": _number(m.get("train_images_per_second")),
        "wall_seconds": _number(m.get("wall_seconds")), "status": str(m.get("status", "unknown")),
        "error": m.get("error"),
        # The configuration a seed repeats: the overrides minus seeds and paths (and alpha
        # for vanilla, which ignores it).
        "config": config_name(overrides, drop=("alpha",) if conv == "vanilla" else ()),
        "run_dir": os.path.relpath(run_dir, sweep_dir),
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
            row["seed"] if isinstance(row["seed"], int) else -1, row["run_dir"])


def aggregate(runs):
    """Completed runs grouped by configuration: mean, std (n > 1) and count of each metric."""
    groups = OrderedDict()
    for row in sorted(runs, key=_sort_key):
        if row["status"] != "completed":
            continue
        groups.setdefault(row["config"], []).append(row)
    out = []
    for config, rows in groups.items():
        first = rows[0]
        agg = {"conv": first["conv"], "alpha": first["alpha"], "expansion": first["expansion"],
               "optimizer": first["optimizer"], "config": config, "n": len(rows),
               "seeds": ",".join(str(r["seed"]) for r in rows),
               "params": first["params"], "flops_per_image": first["flops_per_image"]}
        for metric in AGG_METRICS:
            values = [r[metric] for r in rows if isinstance(r[metric], (int, float))]
            agg[metric] = statistics.fmean(values) if values else None
            agg[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(agg)
    return out


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


def write_csv(path, rows, columns):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text_atomic(path, buf.getvalue())


def markdown(sweep_dir, runs, groups):
    failed = [r for r in runs if r["status"] != "completed"]
    lines = [f"# Sweep summary: {os.path.abspath(sweep_dir)}", "",
             f"{len(runs)} runs: {len(runs) - len(failed)} completed, {len(failed)} not completed."
             " Vanilla ignores alpha and is shown once.", "",
             "## By configuration (mean ± std over seeds)", "",
             "| conv | alpha | expansion | optimizer | seeds | test accuracy % | train loss "
             "| params | MFLOPs/image | train images/s | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g in groups:
        flops = g["flops_per_image"] / 1e6 if g["flops_per_image"] else None
        lines.append(
            f"| {g['conv']} | {_fmt(g['alpha'], 3) or '—'} | {_fmt(g['expansion'])} | "
            f"{_fmt(g['optimizer'])} | {g['n']} | {_pm(g['test_accuracy'], g['test_accuracy_std'])} | "
            f"{_pm(g['train_loss'], g['train_loss_std'], 4)} | {_fmt(g['params'])} | "
            f"{_fmt(flops, 3)} | {_pm(g['train_images_per_second'], g['train_images_per_second_std'], 0)} | "
            f"{_pm(g['wall_seconds'], g['wall_seconds_std'], 1)} |")
    lines += ["", "## Runs", "",
              "| conv | alpha | seed | test accuracy % | train loss | status | run dir |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(runs, key=_sort_key):
        lines.append(f"| {r['conv']} | {_fmt(r['alpha'], 3) or '—'} | {_fmt(r['seed'])} | "
                     f"{_fmt(r['test_accuracy'])} | {_fmt(r['train_loss'], 4)} | {r['status']} | "
                     f"`{r['run_dir']}` |")
    if failed:
        lines += ["", "## Not completed", ""]
        for r in sorted(failed, key=_sort_key):
            lines.append(f"- `{r['run_dir']}`: **{r['status']}** — {r['error'] or 'no error recorded'}")
    present = [p for p in PLOTS if os.path.exists(os.path.join(sweep_dir, p))]
    if present:
        lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in present]
    return "\n".join(lines) + "\n"


def plot(sweep_dir, groups):
    """The three figures, as PNG files in the sweep dir; returns the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.stderr.write("warning: matplotlib is not installed: no plots (pip install matplotlib)\n")
        return []
    written = []
    by_conv = OrderedDict()
    for g in sorted(groups, key=lambda g: (CONV_ORDER.get(g["conv"], 99), g["alpha"] or 0)):
        by_conv.setdefault(g["conv"], []).append(g)

    def alpha_figure(metric, ylabel, filename, title):
        fig, ax = plt.subplots(figsize=(6, 4))
        alphas = [g["alpha"] for g in groups if g["alpha"] is not None]
        for conv, rows in by_conv.items():
            rows = [r for r in rows if r[metric] is not None]
            if not rows:
                continue
            if conv == "vanilla":
                for r in rows:
                    ax.axhline(r[metric], color="black", linestyle="--", label="vanilla")
                    if r[metric + "_std"]:
                        ax.axhspan(r[metric] - r[metric + "_std"], r[metric] + r[metric + "_std"],
                                   color="black", alpha=0.1)
                continue
            rows = [r for r in rows if r["alpha"] is not None]
            ax.errorbar([r["alpha"] for r in rows], [r[metric] for r in rows],
                        yerr=[r[metric + "_std"] or 0 for r in rows], marker="o", capsize=3,
                        label=conv)
        ax.set_xlabel("alpha (share of low-frequency channels)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if alphas:
            ax.set_xticks(sorted(set(alphas)))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        path = os.path.join(sweep_dir, filename)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    alpha_figure("test_accuracy", "test accuracy (%)", PLOTS[0], "Test accuracy vs alpha")
    alpha_figure("train_images_per_second", "training images / s", PLOTS[1],
                 "Training throughput vs alpha")

    fig, ax = plt.subplots(figsize=(6, 4))
    for conv, rows in by_conv.items():
        rows = [r for r in rows if r["flops_per_image"] and r["test_accuracy"] is not None]
        if not rows:
            continue
        ax.errorbar([r["flops_per_image"] / 1e6 for r in rows], [r["test_accuracy"] for r in rows],
                    yerr=[r["test_accuracy_std"] or 0 for r in rows], marker="o", capsize=3,
                    linestyle="-" if conv != "vanilla" else "none", label=conv)
        for r in rows:
            if r["alpha"] is not None:
                ax.annotate(f"α={r['alpha']:g}", (r["flops_per_image"] / 1e6, r["test_accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs compute")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path = os.path.join(sweep_dir, PLOTS[2])
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def build_report(sweep_dir, make_plots=True):
    """Write summary.csv, summary_by_config.csv, summary.md and the plots; returns the runs."""
    if not os.path.isdir(sweep_dir):
        raise ReportError(f"{sweep_dir} is not a directory")
    runs = sorted(find_runs(sweep_dir), key=_sort_key)
    if not runs:
        raise ReportError(f"no run directories (with .hydra/ or metrics.json) under {sweep_dir}")
    groups = aggregate(runs)
    write_csv(os.path.join(sweep_dir, "summary.csv"), runs, RUN_COLUMNS)
    agg_columns = ["conv", "alpha", "expansion", "optimizer", "n", "seeds", "params",
                   "flops_per_image"] + [c for m in AGG_METRICS for c in (m, m + "_std")] + ["config"]
    write_csv(os.path.join(sweep_dir, "summary_by_config.csv"), groups, agg_columns)
    if make_plots and groups:
        plot(sweep_dir, groups)
    write_text_atomic(os.path.join(sweep_dir, "summary.md"), markdown(sweep_dir, runs, groups))
    return runs


def failure_line(sweep_dir, runs):
    failed = [r for r in runs if r["status"] != "completed"]
    if not failed:
        return None
    first = failed[0]
    return (f"{len(failed)} of {len(runs)} runs did not complete (see "
            f"{os.path.join(sweep_dir, 'summary.md')}); first: {first['run_dir']}: "
            f"{first['status']}: {first['error']}")


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class SweepReport(Callback):
    """Hydra callback: the report when a multirun ends, and a non-zero exit if a run failed."""

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = str(config.hydra.sweep.dir)
        try:
            runs = build_report(sweep_dir)
        except ReportError as exc:
            sys.stderr.write(f"error: sweep report: {exc}\n")
            sys.exit(1)
        print(f"Sweep summary: {os.path.join(sweep_dir, 'summary.md')}")
        line = failure_line(sweep_dir, runs)
        if line:
            sys.stderr.write(f"error: {line}\n")
            sys.exit(1)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m octconv_exp.report",
        description="(Re)build summary.csv, summary.md and plots of a sweep directory.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    try:
        runs = build_report(args.sweep_dir, make_plots=not args.no_plots)
    except ReportError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(f"{len(runs)} runs; summary: {os.path.join(args.sweep_dir, 'summary.md')}")
    line = failure_line(args.sweep_dir, runs)
    if line:
        sys.stderr.write(f"warning: {line}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
