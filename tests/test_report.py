"""The sweep report: the job plan (jobs that never started count as missing), the model column,
and figures that people read (a fixed colour per conv mode, titles naming the setup, error
bars saying what they are). Fake sweep dirs, written by hand, except one real tiny sweep."""
import csv
import json
import os

import pytest
import yaml
from matplotlib.colors import to_hex

from conftest import SYNTHETIC_32_NO_SAVES, read_csv, run_cli, run_python
from octconv_exp.reports import report
from octconv_exp.sweeps import sweep
from octconv_exp.records.outputs import OutputError

def make_run(sweep_dir, subdir, metrics=None, overrides=(), config=None):
    """A run dir as a job leaves it: .hydra/overrides.yaml (and config.yaml), metrics.json."""
    d = os.path.join(str(sweep_dir), subdir)
    os.makedirs(os.path.join(d, ".hydra"), exist_ok=True)
    with open(os.path.join(d, ".hydra", "overrides.yaml"), "w") as f:
        yaml.safe_dump(list(overrides), f)
    if config is not None:
        with open(os.path.join(d, ".hydra", "config.yaml"), "w") as f:
            yaml.safe_dump(config, f)
    if metrics is not None:
        with open(os.path.join(d, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    return d


def metrics(conv, alpha=None, seed=0, acc=80.0, **extra):
    m = {"status": "completed", "conv": conv, "alpha": 0.5 if alpha is None else alpha,
         "expansion": 1, "optimizer": "sgd", "seed": seed, "dataset": "synthetic", "epochs": 2,
         "test_accuracy": acc, "train_loss": 1.0, "params": 12346,
         "flops_per_image": {"vanilla": 3.8e6, "octave": 2.8e6}.get(conv, 2.0e6) * (1 - (alpha or 0) / 2),
         "train_images_per_second": 100.0 + acc, "wall_seconds": 3.0}
    m.update(extra)
    return m


def entry(subdir, overrides, **config):
    base = {"conv": "octave", "alpha": 0.5, "expansion": 1, "optimizer": "sgd", "seed": 0,
            "dataset": "synthetic", "model": "seed_cnn", "epochs": 2}
    base.update(config)
    return {"subdir": subdir, "overrides": list(overrides), "config": base}


# ------------------------------------------------------------------------------ the job plan


def planned_sweep(root):
    """Three planned jobs: one completed, one killed (run dir, no metrics.json), one that
    never started (no run dir)."""
    sweep.write_plan(str(root), [
        entry("alpha=0.25/seed=0", ["conv=octave", "alpha=0.25", "seed=0"], alpha=0.25),
        entry("alpha=0.5/seed=0", ["conv=octave", "alpha=0.5", "seed=0"]),
        entry("alpha=0.75/seed=1", ["conv=octave", "alpha=0.75", "seed=1"], alpha=0.75, seed=1,
              model="wide_cnn"),
    ])
    make_run(root, "alpha=0.25/seed=0", metrics("octave", 0.25),
             ["conv=octave", "alpha=0.25", "seed=0"])
    make_run(root, "alpha=0.5/seed=0", None, ["conv=octave", "alpha=0.5", "seed=0"])
    return root


def test_planned_jobs_without_a_run_dir_count_as_missing(tmp_path):
    runs = report.build_report(str(planned_sweep(tmp_path)), make_plots=False)
    by_dir = {r["run_dir"]: r for r in runs}
    assert sorted(by_dir) == ["alpha=0.25/seed=0", "alpha=0.5/seed=0", "alpha=0.75/seed=1"]
    never = by_dir["alpha=0.75/seed=1"]
    assert never["status"] == "missing" and "never started" in never["error"]
    # What it was to be, from the plan.
    assert (never["conv"], never["alpha"], never["seed"], never["model"]) == \
        ("octave", 0.75, 1, "wide_cnn")
    assert never["config"] == "conv=octave,alpha=0.75"
    assert by_dir["alpha=0.5/seed=0"]["status"] == "missing"
    assert "killed" in by_dir["alpha=0.5/seed=0"]["error"]

    line = report.failure_line(str(tmp_path), runs)
    assert line.startswith("2 of 3 runs did not complete, 1 of them never started")
    rows = read_csv(tmp_path / "summary.csv")
    assert [r["status"] for r in rows] == ["completed", "missing", "missing"]
    md = (tmp_path / "summary.md").read_text()
    assert "3 runs: 1 completed, 2 not completed (1 never started)." in md
    assert "`alpha=0.75/seed=1`: **missing** — never started" in md


def test_a_sweep_dir_without_a_plan_reports_as_before(tmp_path):
    make_run(tmp_path, "alpha=0.25/seed=0", metrics("octave", 0.25), ["conv=octave", "alpha=0.25"])
    make_run(tmp_path, "alpha=0.5/seed=0", None, ["conv=octave", "alpha=0.5"])
    runs = report.build_report(str(tmp_path), make_plots=False)
    assert [(r["run_dir"], r["status"]) for r in runs] == [
        ("alpha=0.25/seed=0", "completed"), ("alpha=0.5/seed=0", "missing")]
    assert report.failure_line(str(tmp_path), runs).startswith("1 of 2 runs did not complete (")
    assert "never started" not in (tmp_path / "summary.md").read_text()
    # Only a plan: every job is missing, and that is a report, not "no runs".
    empty = tmp_path / "planned_only"
    sweep.write_plan(str(empty), [entry("conv=vanilla/seed=0", ["conv=vanilla"], conv="vanilla")])
    (only,) = report.build_report(str(empty))
    assert (only["conv"], only["alpha"], only["status"]) == ("vanilla", None, "missing")


def test_a_planned_dir_that_exists_but_holds_no_run_is_still_counted(tmp_path):
    sweep.write_plan(str(tmp_path), [entry("alpha=0.5/seed=0", ["alpha=0.5"])])
    (tmp_path / "alpha=0.5" / "seed=0").mkdir(parents=True)  # e.g. only a log was written
    (run,) = report.build_report(str(tmp_path), make_plots=False)
    assert run["status"] == "missing" and "never started?" in run["error"]


@pytest.mark.parametrize("text", ["jobs: [unclosed\n", "just a string\n", "jobs: 3\n"])
def test_an_unreadable_plan_is_a_warning_and_the_report_goes_on(tmp_path, text, capsys):
    make_run(tmp_path, "alpha=0.25/seed=0", metrics("octave", 0.25), ["conv=octave", "alpha=0.25"])
    (tmp_path / sweep.PLAN_FILE).write_text(text)
    runs = report.build_report(str(tmp_path), make_plots=False)
    assert [r["status"] for r in runs] == ["completed"]
    md = (tmp_path / "summary.md").read_text()
    assert "## Warnings" in md and "jobs that never started cannot be counted" in md
    assert "warning: jobs.yaml" in capsys.readouterr().err


def test_bad_plan_entries_are_left_out_one_by_one(tmp_path):
    good = entry("alpha=0.5/seed=0", ["conv=octave", "alpha=0.5"])
    bad = [{"subdir": "../outside"}, {"subdir": "/abs"}, "a string", {"overrides": ["x=1"]},
           {"subdir": "alpha=0.75/seed=0", "overrides": "not a list", "config": [1]}]
    (tmp_path / sweep.PLAN_FILE).write_text(yaml.safe_dump({"version": 1, "jobs": [good] + bad}))
    runs = report.build_report(str(tmp_path), make_plots=False)
    assert sorted(r["run_dir"] for r in runs) == ["alpha=0.5/seed=0", "alpha=0.75/seed=0"]
    assert all(r["status"] == "missing" for r in runs)
    assert (tmp_path / "summary.md").read_text().count("has no subdir inside the sweep dir") == 4


def test_the_plan_is_written_atomically_and_merged_on_a_rerun(tmp_path, monkeypatch):
    first = [entry("alpha=0.25/seed=0", ["conv=octave", "alpha=0.25"]),
             entry("alpha=0.5/seed=0", ["conv=octave", "alpha=0.5"]),
             entry("alpha=0.75/seed=0", ["conv=octave", "alpha=0.75"])]
    path = sweep.write_plan(str(tmp_path), first)
    assert path == str(tmp_path / "jobs.yaml")
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    plan, problems = sweep.read_plan(str(tmp_path))
    assert plan == first and problems == []

    # A resume: the same jobs with resume=true and more epochs, under the same names.
    resumed = [dict(e, overrides=e["overrides"] + ["resume=true", "trainer.epochs=4"])
               for e in first]
    sweep.write_plan(str(tmp_path), resumed)
    assert sweep.read_plan(str(tmp_path))[0] == resumed
    # A re-run of one job alone (a single job is named by all its overrides): it supersedes
    # the job of the same overrides; the others stay planned.
    alone = [entry("conv=octave,alpha=0.75/seed=0", ["conv=octave", "alpha=0.75"])]
    sweep.write_plan(str(tmp_path), alone)
    assert [e["subdir"] for e in sweep.read_plan(str(tmp_path))[0]] == [
        "conv=octave,alpha=0.75/seed=0", "alpha=0.25/seed=0", "alpha=0.5/seed=0"]

    before = (tmp_path / "jobs.yaml").read_text()

    def refuse(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError):
        sweep.write_plan(str(tmp_path), first)
    assert (tmp_path / "jobs.yaml").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["jobs.yaml"]  # no temp file left behind


def test_a_killed_run_takes_what_it_was_from_its_config(tmp_path):
    config = {"conv": {"mode": "multi-octave"}, "alpha": 0.25, "seed": 3, "expansion": 2,
              "optimizer": {"name": "adam"}, "dataset": {"name": "cifar10"},
              "trainer": {"epochs": 7}, "model": {"name": "wide_cnn"}}
    make_run(tmp_path, "x/seed=3", None, [], config=config)
    (run,) = report.find_runs(str(tmp_path))
    assert (run["conv"], run["alpha"], run["seed"], run["model"], run["optimizer"],
            run["dataset"], run["epochs"]) == ("multi-octave", 0.25, 3, "wide_cnn", "adam",
                                               "cifar10", 7)
    (tmp_path / "x" / "seed=3" / ".hydra" / "config.yaml").write_text("[not: a mapping")
    (run,) = report.find_runs(str(tmp_path))
    assert run["status"] == "missing" and run["model"] == "seed_cnn"


def test_the_report_command_counts_jobs_that_never_started(tmp_path):
    planned_sweep(tmp_path)
    out = run_python("-m", "octconv_exp.report", "--no-plots", str(tmp_path), timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("warning: 2 of 3 runs did not complete, 1 of them never started")


@pytest.mark.slow
def test_the_sweeper_plans_the_real_job_dirs(tmp_path):
    """A real sweep: the plan has the jobs it launched (vanilla once), named as their dirs;
    a job removed afterwards (as if it never started) is reported missing."""
    sweep_dir = tmp_path / "s"
    res = run_cli("-m", "conv=vanilla,octave", "alpha=0.25,0.5", *SYNTHETIC_32_NO_SAVES,
                  f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    plan, problems = sweep.read_plan(str(sweep_dir))
    assert problems == []
    run_dirs = sorted(os.path.relpath(d, sweep_dir) for d, _, files in os.walk(sweep_dir)
                      if "metrics.json" in files)
    assert sorted(e["subdir"] for e in plan) == run_dirs == [
        "conv=octave,alpha=0.25/seed=0", "conv=octave,alpha=0.5/seed=0", "conv=vanilla/seed=0"]
    vanilla = next(e for e in plan if e["subdir"] == "conv=vanilla/seed=0")
    assert not any(o.startswith("alpha=") for o in vanilla["overrides"])  # deduped as launched
    for e in plan:
        with open(os.path.join(sweep_dir, e["subdir"], ".hydra", "overrides.yaml")) as f:
            assert yaml.safe_load(f) == e["overrides"]
        with open(os.path.join(sweep_dir, e["subdir"], "metrics.json")) as f:
            m = json.load(f)
        assert {k: m[k] for k in ("conv", "seed", "dataset", "epochs")} == \
            {k: e["config"][k] for k in ("conv", "seed", "dataset", "epochs")}
        assert e["config"]["model"] == m.get("model", "seed_cnn")
    assert len(read_csv(sweep_dir / "summary.csv")) == 3

    import shutil

    shutil.rmtree(sweep_dir / "conv=octave,alpha=0.5")
    runs = report.build_report(str(sweep_dir), make_plots=False)
    (missing,) = [r for r in runs if r["status"] != "completed"]
    assert missing["run_dir"] == "conv=octave,alpha=0.5/seed=0" and missing["alpha"] == 0.5
    assert missing["config"] == next(r["config"] for r in runs if r["alpha"] == 0.25).replace(
        "alpha=0.25", "alpha=0.5")  # the same configuration names as the runs that did run
    assert "1 of 3 runs did not complete, 1 of them never started" in \
        report.failure_line(str(sweep_dir), runs)


# ------------------------------------------------------------------------------ model column


def test_the_model_is_a_column_and_models_never_aggregate_together(tmp_path):
    ov = ["conv=octave", "alpha=0.5"]
    make_run(tmp_path, "a/seed=0", metrics("octave", 0.5, seed=0, acc=70.0), ov)  # an old run
    make_run(tmp_path, "a/seed=1", metrics("octave", 0.5, seed=1, acc=72.0, model="seed_cnn"), ov)
    make_run(tmp_path, "b/seed=0", metrics("octave", 0.5, seed=0, acc=90.0, model="wide_cnn"), ov)
    runs = report.build_report(str(tmp_path), make_plots=False)
    with open(tmp_path / "summary.csv") as f:
        header = f.readline().strip().split(",")
    assert header[:3] == ["conv", "model", "alpha"] and header[-4:] == ["config", "run_dir", "val_accuracy", "best_epoch"]
    assert [r["model"] for r in read_csv(tmp_path / "summary.csv")] == [
        "seed_cnn", "seed_cnn", "wide_cnn"]
    groups = read_csv(tmp_path / "summary_by_config.csv")
    assert [(g["model"], g["n"], float(g["test_accuracy"])) for g in groups] == [
        ("seed_cnn", "2", 71.0), ("wide_cnn", "1", 90.0)]
    md = (tmp_path / "summary.md").read_text()
    assert "| octave | 0.500 | wide_cnn | 1 | sgd | 1 |" in md
    assert "| octave | 0.500 | seed_cnn | 1 | 72.00 |" in md  # the run of seed 1
    assert "model: seed_cnn, wide_cnn" in md
    # Plots tell them apart too.
    labels = legend_colors(report.figures(report.aggregate(runs))[report.PLOTS[0]])
    assert set(labels) == {"octave (model=seed_cnn)", "octave (model=wide_cnn)"}


@pytest.mark.parametrize("convs, said", [(("octave", "multi-octave"), False),
                                          (("vanilla", "octave"), True)])
def test_vanilla_ignores_alpha_is_said_only_where_the_sweep_has_vanilla(tmp_path, convs, said):
    for conv in convs:
        make_run(tmp_path, f"conv={conv}/seed=0", metrics(conv, 0.25), [f"conv={conv}"])
    report.build_report(str(tmp_path), make_plots=False)
    assert ("Vanilla ignores alpha" in (tmp_path / "summary.md").read_text()) == said


def test_a_job_first_run_by_a_resumed_sweep_aggregates_with_its_seeds(tmp_path):
    make_run(tmp_path, "alpha=0.5/seed=0", metrics("octave", 0.5, seed=0), ["alpha=0.5", "seed=0"])
    make_run(tmp_path, "alpha=0.5/seed=1", metrics("octave", 0.5, seed=1),
             ["alpha=0.5", "seed=1", "resume=true"])
    report.build_report(str(tmp_path), make_plots=False)
    (group,) = read_csv(tmp_path / "summary_by_config.csv")
    assert group["n"] == "2" and group["config"] == "alpha=0.5"


# ------------------------------------------------------------------------------ figures


def legend_colors(fig):
    """{legend label: colour (hex)} of a figure's only axes."""
    (ax,) = fig.axes
    out = {}
    for handle, label in zip(*ax.get_legend_handles_labels()):
        if label.startswith("Pareto front") or label.endswith("± std"):
            continue  # not a series of a conv mode (test_the_pareto_front_is_written_and_ringed)
        line = handle.lines[0] if hasattr(handle, "lines") else handle  # errorbar or axhline
        out[label] = to_hex(line.get_color())
    return out


def groups_of(tmp_path, seeds, per_seed=None):
    """Aggregated groups of vanilla, octave and multi-octave runs, ``seeds[conv]`` seeds each
    (``per_seed[seed]``: what differs in that seed's metrics)."""
    per_seed = per_seed or {}
    for conv, n in seeds.items():
        for alpha in ((None,) if conv == "vanilla" else (0.25, 0.5)):
            for seed in range(n):
                ov = [f"conv={conv}", f"seed={seed}"] + ([f"alpha={alpha}"] if alpha else [])
                make_run(tmp_path, f"{conv},{alpha}/seed={seed}",
                         metrics(conv, alpha, seed=seed, acc=70.0 + seed + (alpha or 0) * 10,
                                 **per_seed.get(seed, {})), ov)
    return report.aggregate(report.find_runs(str(tmp_path)))


def test_each_conv_mode_has_one_colour_in_every_figure(tmp_path):
    groups = groups_of(tmp_path, {"vanilla": 3, "octave": 3, "multi-octave": 3})
    figs = report.figures(groups)
    assert list(figs) == list(report.PLOTS)
    expected = {conv: to_hex(report.CONV_COLORS[conv]) for conv in ("vanilla", "octave", "multi-octave")}
    assert expected["vanilla"] == "#000000" and len(set(expected.values())) == 3
    for name, fig in figs.items():
        assert legend_colors(fig) == expected, name
    # The vanilla band (std over seeds) is vanilla's colour too; the order of the groups does
    # not change any colour.
    (ax,) = figs[report.PLOTS[0]].axes
    assert [to_hex(p.get_facecolor()[:3]) for p in ax.patches] == ["#000000"]
    for fig in report.figures(list(reversed(groups))).values():
        assert legend_colors(fig) == expected
    # A conv mode we do not know gets a colour of its own, always the same.
    assert report.conv_color("other") == report.conv_color("other") not in expected.values()


def test_titles_are_short_and_the_captions_name_the_setup_and_the_error_bars(tmp_path):
    """A paper's figure has a short title; the setup (data, model, epochs) and what the error
    bars are go into the caption line under each figure in summary.md."""
    groups = groups_of(tmp_path / "a", {"vanilla": 3, "octave": 3, "multi-octave": 3})
    for name, fig in report.figures(groups).items():
        (ax,) = fig.axes
        assert ax.get_title() == report.FIGURE_TITLES[name]
        assert ax.get_legend().get_title().get_text() == "mean ± std over 3 seeds"
    assert report.caption(groups, report.PLOTS[0]) == (
        "Test accuracy vs alpha. data: synthetic; model: seed_cnn; epochs: 2. "
        "Error bars and vanilla's band: mean ± std over 3 seeds.")
    assert report.caption(groups, report.PLOTS[2]) == (
        "Accuracy vs compute. data: synthetic; model: seed_cnn; epochs: 2. "
        "Error bars: mean ± std over 3 seeds.")

    mixed = groups_of(tmp_path / "b", {"vanilla": 2, "octave": 3},
                      {2: {"dataset": "cifar10", "epochs": 10, "model": "seed_cnn"}})
    # The third seed of octave is another data set: runs differ, every value is named.
    for name, fig in report.figures(mixed).items():
        (ax,) = fig.axes
        assert "\n" not in ax.get_title() and "data:" not in ax.get_title()
        assert ax.get_legend().get_title().get_text() == "mean ± std over N=2-3 seeds"
        assert "data: cifar10, synthetic; model: seed_cnn; epochs: 2, 10. Error bars" \
            in report.caption(mixed, name)
    report.build_report(str(tmp_path / "b"), formats=["png"], dpi=50)
    md = (tmp_path / "b" / "summary.md").read_text()
    assert "![accuracy_vs_flops](accuracy_vs_flops.png)\n*Accuracy vs compute. data: cifar10, " \
        "synthetic; model: seed_cnn; epochs: 2, 10. Error bars: mean ± std over N=2-3 seeds.*\n" \
        in md

    single = groups_of(tmp_path / "c", {"vanilla": 1, "octave": 1})
    (ax,) = report.figures(single)[report.PLOTS[0]].axes
    assert ax.get_legend().get_title().get_text() == "1 seed per point (no error bars)"
    assert "mean ± std" not in ax.get_title()


def test_n_counts_the_runs_that_had_the_metric(tmp_path):
    groups = groups_of(tmp_path, {"octave": 3}, {0: {"train_images_per_second": None}})
    figs = report.figures(groups)
    assert figs[report.PLOTS[0]].axes[0].get_legend().get_title().get_text() == \
        "mean ± std over 3 seeds"
    assert figs[report.PLOTS[1]].axes[0].get_legend().get_title().get_text() == \
        "mean ± std over 2 seeds"


def test_series_are_split_by_what_else_varies(tmp_path):
    for opt in ("sgd", "adam"):
        for conv, alpha in (("vanilla", None), ("octave", 0.25), ("octave", 0.5)):
            ov = [f"conv={conv}", f"optimizer={opt}", "trainer.epochs=2"] + (
                [f"alpha={alpha}"] if alpha else [])
            make_run(tmp_path, f"{opt},{conv},{alpha}/seed=0",
                     metrics(conv, alpha, optimizer=opt), ov)
    groups = report.aggregate(report.find_runs(str(tmp_path)))
    for fig in report.figures(groups).values():
        colors = legend_colors(fig)
        assert sorted(colors) == ["octave (optimizer=adam)", "octave (optimizer=sgd)",
                                  "vanilla (optimizer=adam)", "vanilla (optimizer=sgd)"]
        assert {c for label, c in colors.items() if label.startswith("octave")} == {
            to_hex(report.CONV_COLORS["octave"])}
        (ax,) = fig.axes
        lines = [h.lines[0] if hasattr(h, "lines") else h
                 for h, label in zip(*ax.get_legend_handles_labels())
                 if not label.startswith("Pareto front")]
        assert len({(ln.get_linestyle(), ln.get_marker()) for ln in lines}) == 4


def test_plots_are_written_as_png_files(tmp_path):
    groups_of(tmp_path, {"vanilla": 2, "octave": 2, "multi-octave": 2})
    report.build_report(str(tmp_path))
    for name in report.PLOTS:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp files
    assert "![accuracy_vs_alpha](accuracy_vs_alpha.png)" in (tmp_path / "summary.md").read_text()


def test_validation_accuracy_and_best_epoch_reach_the_summaries(tmp_path):
    from octconv_exp.reports.report import build_report

    for seed, val in ((0, 61.0), (1, 63.0)):
        make_run(tmp_path, f"conv=octave,alpha=0.5/seed={seed}",
                 {"status": "completed", "conv": "octave", "alpha": 0.5, "seed": seed,
                  "test_accuracy": 60.0 + seed, "val_accuracy": val, "best_epoch": 3},
                 overrides=["conv=octave", "alpha=0.5", f"seed={seed}"])
    build_report(str(tmp_path), make_plots=False)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert sorted((r["val_accuracy"], r["best_epoch"]) for r in rows) == [("61.0", "3"),
                                                                       ("63.0", "3")]
    groups = list(csv.DictReader(open(tmp_path / "summary_by_config.csv")))
    assert float(groups[0]["val_accuracy"]) == 62.0
    assert "val accuracy % (best epoch)" in (tmp_path / "summary.md").read_text()


def test_the_pareto_front_is_written_and_ringed(tmp_path):
    """pareto.csv: the configurations no other beats in both accuracy and FLOPs (grid sweeps
    too); the accuracy-vs-FLOPs and accuracy-vs-throughput figures ring their fronts."""
    import csv

    rows = [("vanilla", None, 80.0, 4.0e6, 900.0), ("octave", 0.25, 78.0, 3.0e6, 1200.0),
            ("octave", 0.5, 79.0, 2.0e6, 1000.0), ("multi-octave", 0.5, 79.0, 2.0e6, 1500.0),
            ("octave", 0.75, 70.0, 2.5e6, 800.0)]
    for i, (conv, alpha, acc, flops, speed) in enumerate(rows):
        d = tmp_path / f"run{i}"
        (d / ".hydra").mkdir(parents=True)
        overrides = [f"conv={conv}"] + ([f"alpha={alpha}"] if alpha is not None else [])
        (d / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides))
        (d / "metrics.json").write_text(json.dumps({
            "status": "completed", "conv": conv, "alpha": alpha if alpha is not None else 0.5,
            "seed": 0, "test_accuracy": acc, "flops_per_image": flops,
            "train_images_per_second": speed, "params": 1000, "model": "seed_cnn"}))
    report.build_report(str(tmp_path))
    with open(tmp_path / "pareto.csv") as f:
        front = [(r["conv"], r["alpha"]) for r in csv.DictReader(f)]
    # accuracy up, FLOPs down: vanilla (best accuracy) and both alpha=0.5 (fewest FLOPs, and
    # the more accurate of the rest); octave 0.25 and 0.75 are beaten.
    assert front == [("vanilla", ""), ("octave", "0.5"), ("multi-octave", "0.5")]
    groups = report.aggregate(report.find_runs(str(tmp_path)))
    figs = report.figures(groups)
    for name, expected in (("accuracy_vs_flops.png", {(4.0, 80.0), (2.0, 79.0)}),
                           ("accuracy_vs_throughput.png", {(900.0, 80.0), (1500.0, 79.0)})):
        (ax,) = figs[name].axes
        handles, labels = ax.get_legend_handles_labels()
        (ring,) = [h for h, label in zip(handles, labels) if label.startswith("Pareto front")]
        assert set(zip(*ring.get_data())) == expected, name


# ------------------------------------------------------------------------------ what varies


def run_config(epochs=2, train_size=400, optimizer="sgd", lr=0.05, **top):
    """A .hydra/config.yaml as Hydra saves it (interpolations unresolved)."""
    opt = {"name": optimizer, "lr": lr}
    opt.update({"momentum": 0.0} if optimizer == "sgd" else {"betas": [0.9, 0.999]})
    cfg = {"conv": {"mode": "octave"}, "alpha": 0.5, "expansion": 1, "seed": 0,
           "optimizer": opt, "model": {"name": "seed_cnn"},
           "dataset": {"name": "synthetic", "train_size": train_size, "root": "/data/x"},
           "trainer": {"epochs": epochs, "progress_bar": False},
           "scheduler": {"name": "cosine", "T_max": "${trainer.epochs}"},
           "logger": {"csv": {}}, "resume": False}
    cfg.update(top)
    return cfg


def test_every_config_key_that_varies_is_a_column_and_splits_the_groups(tmp_path):
    """Run dirs of separate runs with the same overrides (the same preset, say) that differ
    in epochs and data set size: each difference is a column, and none are averaged as
    seeds. What does not change a run (paths, progress bars, loggers) is no column, nor are
    an option's own keys between different options (adam's betas against sgd's momentum)."""
    ov = ["conv=octave", "alpha=0.5"]
    cases = {"a": dict(epochs=1, train_size=400, acc=70.0),
             "b": dict(epochs=2, train_size=400, acc=75.0),
             "c": dict(epochs=1, train_size=800, acc=72.0),
             "d": dict(epochs=1, train_size=800, acc=74.0, optimizer="adam")}
    for name, case in cases.items():
        optimizer = case.get("optimizer", "sgd")
        cfg = run_config(case["epochs"], case["train_size"], optimizer)
        cfg["dataset"]["root"] = f"/data/{name}"
        cfg["trainer"]["progress_bar"] = name == "a"
        make_run(tmp_path, f"{name}/seed=0", metrics("octave", 0.5, acc=case["acc"],
                                                     optimizer=optimizer), ov, config=cfg)
    runs = report.build_report(str(tmp_path), make_plots=False)
    assert report.varying_keys(runs) == ["dataset.train_size", "trainer.epochs"]
    groups = read_csv(tmp_path / "summary_by_config.csv")
    assert sorted((g["optimizer"], g["dataset.train_size"], g["trainer.epochs"], g["n"],
                   float(g["test_accuracy"])) for g in groups) == [
        ("adam", "800", "1", "1", 74.0), ("sgd", "400", "1", "1", 70.0),
        ("sgd", "400", "2", "1", 75.0), ("sgd", "800", "1", "1", 72.0)]
    rows = {r["run_dir"]: r for r in read_csv(tmp_path / "summary.csv")}
    assert (rows["b/seed=0"]["trainer.epochs"], rows["c/seed=0"]["dataset.train_size"]) == \
        ("2", "800")
    md = (tmp_path / "summary.md").read_text()
    assert "| optimizer | dataset.train_size | trainer.epochs | seeds | runs |" in md
    assert "| octave | 0.500 | seed_cnn | 1 | sgd | 400 | 2 | 1 | 1 | 75.00 |" in md
    assert "| octave | 0.500 | seed_cnn | 800 | 1 | 0 | 72.00 |" in md  # the runs table
    # The plots tell the series apart by the same keys.
    labels = set(legend_colors(report.figures(report.aggregate(runs))[report.PLOTS[0]]))
    assert labels == {"octave (optimizer=sgd,dataset.train_size=400,trainer.epochs=1)",
                      "octave (optimizer=sgd,dataset.train_size=400,trainer.epochs=2)",
                      "octave (optimizer=sgd,dataset.train_size=800,trainer.epochs=1)",
                      "octave (optimizer=adam,dataset.train_size=800,trainer.epochs=1)"}

    # The same options with another learning rate: that varies too.
    make_run(tmp_path, "e/seed=0", metrics("octave", 0.5, acc=60.0), ov,
             config=run_config(1, 400, lr=0.1))
    assert report.varying_keys(report.find_runs(str(tmp_path))) == [
        "dataset.train_size", "optimizer.lr", "trainer.epochs"]


def test_runs_without_a_config_and_runs_that_agree_have_no_extra_columns(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"a/seed={seed}", metrics("octave", 0.5, seed=seed),
                 ["conv=octave", "alpha=0.5", f"seed={seed}"], config=dict(run_config(), seed=seed))
    make_run(tmp_path, "b/seed=0", metrics("octave", 0.25), ["alpha=0.25"])
    runs = report.build_report(str(tmp_path), make_plots=False)
    assert report.varying_keys(runs) == []
    with open(tmp_path / "summary.csv") as f:
        assert f.readline().strip().split(",")[-1] == "best_epoch"
    (group,) = [g for g in read_csv(tmp_path / "summary_by_config.csv") if g["alpha"] == "0.5"]
    assert (group["n"], group["seeds"]) == ("2", "0,1")


def test_seeds_count_distinct_seeds_and_a_repeated_configuration_is_one_row(tmp_path):
    """Two runs of seed 0 (a search that once trained the same parameters twice) and one of
    seed 1: one row, 2 seeds, 3 runs; pareto.csv lists the configuration once."""
    ov = ["conv=multi-octave", "alpha=0.5", "expansion=1"]
    for trial, seed, acc in ((0, 0, 19.0), (3, 0, 19.0), (5, 1, 21.0)):
        make_run(tmp_path, f"trial={trial}",
                 metrics("multi-octave", 0.5, seed=seed, acc=acc), ov + [f"seed={seed}"])
    make_run(tmp_path, "trial=1", metrics("multi-octave", 0.25, acc=18.0),
             ["conv=multi-octave", "alpha=0.25", "expansion=1", "seed=0"])
    report.build_report(str(tmp_path))
    groups = {g["alpha"]: g for g in read_csv(tmp_path / "summary_by_config.csv")}
    assert (groups["0.5"]["n"], groups["0.5"]["seeds"]) == ("3", "0,1")
    assert float(groups["0.5"]["test_accuracy"]) == pytest.approx(59.0 / 3)
    md = (tmp_path / "summary.md").read_text()
    assert "| multi-octave | 0.500 | seed_cnn | 1 | sgd | 2 | 3 | 19.67 ± 1.15 |" in md
    assert "| multi-octave | 0.250 | seed_cnn | 1 | sgd | 1 | 1 | 18.00 |" in md
    front = read_csv(tmp_path / "pareto.csv")
    assert [(r["alpha"], r["n"], r["seeds"]) for r in front] == [("0.5", "3", "0,1")]
    # The error bars say they are over runs, not seeds.
    groups = report.aggregate(report.find_runs(str(tmp_path)))
    title = report.figures(groups)[report.PLOTS[0]].axes[0].get_legend().get_title().get_text()
    assert title == "mean ± std over N=1-3 runs"


@pytest.mark.slow
def test_the_report_of_real_runs_that_differ_in_epochs_and_data_size(tmp_path):
    """Two single runs of the same overrides but epochs and training-set size, and a third of
    another size, reported together: once three rows that read the same."""
    base = [o for o in SYNTHETIC_32_NO_SAVES
            if not o.startswith(("trainer.epochs=", "dataset.train_size="))]
    for name, extra in (("a", ["trainer.epochs=1", "dataset.train_size=32"]),
                        ("b", ["trainer.epochs=2", "dataset.train_size=32"]),
                        ("c", ["trainer.epochs=1", "dataset.train_size=48"])):
        res = run_cli(*base, "conv=octave", "alpha=0.5", *extra,
                      f"hydra.run.dir={tmp_path / 'runs' / name}")
        assert res.returncode == 0, res.stderr[-3000:]
    out = run_python("-m", "octconv_exp.report", "--no-plots", str(tmp_path / "runs"),
                     timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["run_dir"]: (r["dataset.train_size"], r["trainer.epochs"])
            for r in read_csv(tmp_path / "runs" / "summary.csv")}
    assert rows == {"a": ("32", "1"), "b": ("32", "2"), "c": ("48", "1")}
    groups = read_csv(tmp_path / "runs" / "summary_by_config.csv")
    assert sorted((g["dataset.train_size"], g["trainer.epochs"], g["n"]) for g in groups) == [
        ("32", "1", "1"), ("32", "2", "1"), ("48", "1", "1")]
    md = (tmp_path / "runs" / "summary.md").read_text()
    assert "Also varying between the runs: `dataset.train_size`, `trainer.epochs`" in md
