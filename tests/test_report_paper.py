"""The sweep report as a paper takes it (issue 29.3): figures in PDF/SVG that parse, with the
same colour per conv mode and a label at every point, labels that do not overlap, a 95 %
Student-t interval beside each std, summary.tex (booktabs), report.format/report.dpi.
Fake sweep dirs written by hand (tests/test_report.py's helpers), one real tiny sweep."""
import csv
import math
import os
import re
import struct
import xml.etree.ElementTree as ET

import pytest
from matplotlib.colors import to_hex
from matplotlib.text import Annotation, Text

from conftest import SYNTHETIC_32_NO_SAVES, compose_config, read_csv, run_cli, run_python
from octconv_exp.reports import report
from octconv_exp.config.schema import ConfigError, report_settings, validate
from octconv_exp.reports import labels, latex, stats
from test_report import groups_of, make_run, metrics

SVG = "{http://www.w3.org/2000/svg}"
CONVS = ("vanilla", "octave", "multi-octave")


def svg_texts(path):
    """Every text of an SVG file (matplotlib writes each string as one <text> element)."""
    root = ET.parse(path).getroot()
    return ["".join(t.itertext()).strip() for t in root.iter(SVG + "text")]


def svg_style(path, element_id, prop):
    """A style property (``stroke``, ``fill``) of the first drawn path inside the SVG element
    of that id (an artist's gid)."""
    root = ET.parse(path).getroot()
    (group,) = [e for e in root.iter() if e.get("id") == element_id]
    for element in group.iter():
        style = dict(part.split(":", 1) for part in (element.get("style") or "").split(";")
                     if ":" in part)
        style = {k.strip(): v.strip() for k, v in style.items()}
        if prop in style:
            return style[prop]
    raise AssertionError(f"{element_id} has no {prop}")


def pdf_pages(data):
    """The page count of a PDF (its /Type /Page objects; /Pages is the tree above them)."""
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))


def annotations(fig):
    (ax,) = fig.axes
    return [c for c in ax.get_children() if isinstance(c, Annotation)]


# ------------------------------------------------------------------------------ files


def test_figures_are_written_in_every_format_and_each_file_parses(tmp_path):
    groups_of(tmp_path, {conv: 3 for conv in CONVS})
    report.build_report(str(tmp_path), formats=["png", "pdf", "svg"], dpi=50)
    for name in report.PLOTS:
        stem = name[:-4]
        with open(tmp_path / f"{stem}.png", "rb") as f:
            png = f.read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        # report.dpi: the 6.4 x 4.6 inch figure at 50 dpi (matplotlib < 3.8 rounds 229.99 down).
        width, height = struct.unpack(">II", png[16:24])
        assert width == 320 and height in (229, 230)
        with open(tmp_path / f"{stem}.pdf", "rb") as f:
            pdf = f.read()
        assert pdf.startswith(b"%PDF-1.") and pdf.rstrip().endswith(b"%%EOF")
        assert pdf_pages(pdf) == 1
        # Text stays text (a journal's checker reads fonts; Type 3 is refused by some).
        assert b"/Subtype /Type3" not in pdf
        assert b"/Subtype /TrueType" in pdf or b"/Subtype /Type0" in pdf
        texts = svg_texts(tmp_path / f"{stem}.svg")
        assert report.FIGURE_TITLES[name] in texts
        assert "mean ± std over 3 seeds" in texts
    md = (tmp_path / "summary.md").read_text()
    assert "![accuracy_vs_alpha](accuracy_vs_alpha.png)" in md
    assert "Also: [PDF](accuracy_vs_alpha.pdf), [SVG](accuracy_vs_alpha.svg)." in md
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp files


def test_pdf_font_subsetting_logs_nothing_at_info(tmp_path, caplog):
    """Under Hydra's INFO root logger, fontTools logged every table it pruned while the PDFs'
    fonts were subset (a hundred lines after `make demo`'s sweep): not any more, and its
    logger's own level is left as it was."""
    import logging

    groups_of(tmp_path, {conv: 3 for conv in CONVS})
    font_logger = logging.getLogger("fontTools")
    before = font_logger.level
    with caplog.at_level(logging.INFO):
        report.build_report(str(tmp_path), formats=["pdf"], dpi=50)
    assert all((tmp_path / f"{name[:-4]}.pdf").is_file() for name in report.PLOTS)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("fontTools")] == []
    assert font_logger.level == before


def test_the_same_figure_is_the_same_bytes_in_vector_formats(tmp_path):
    """No dates and fixed SVG ids: rebuilding a report does not change its PDF/SVG files."""
    groups_of(tmp_path, {"vanilla": 2, "octave": 2})
    before = {}
    for round_ in range(2):
        report.build_report(str(tmp_path), formats=["pdf", "svg"], dpi=50)
        files = {n: (tmp_path / n).read_bytes() for n in report.figure_files(["pdf", "svg"])}
        if round_:
            assert files == before
        before = files
    assert not os.path.exists(tmp_path / "accuracy_vs_alpha.png")  # only what was asked
    # Without a PNG summary.md shows the SVG.
    assert "![accuracy_vs_alpha](accuracy_vs_alpha.svg)" in (tmp_path / "summary.md").read_text()


def test_each_conv_mode_has_one_colour_in_every_svg_figure(tmp_path):
    groups_of(tmp_path, {conv: 2 for conv in CONVS})
    report.build_report(str(tmp_path), formats=["svg"], dpi=50)
    expected = {conv: to_hex(report.CONV_COLORS[conv]) for conv in CONVS}
    assert len(set(expected.values())) == 3
    for name in report.PLOTS:
        path = tmp_path / (name[:-4] + ".svg")
        found = {conv: svg_style(path, f"series-{conv}-0", "stroke") for conv in CONVS}
        assert found == expected, name
        # Each point's label is in its series' colour too.
        root = ET.parse(path).getroot()
        label_colors = {}
        for text in root.iter(SVG + "text"):
            style = text.get("style") or ""
            match = re.search(r"fill:\s*(#[0-9a-f]{6})", style)
            if "".join(text.itertext()).startswith("α=") and match:
                label_colors.setdefault(match.group(1), 0)
                label_colors[match.group(1)] += 1
        if name in report.PLOTS[2:]:
            assert label_colors == {expected["octave"]: 2, expected["multi-octave"]: 2}, name
    # The vanilla std band is vanilla's colour, and it is in the legend.
    alpha_svg = tmp_path / "accuracy_vs_alpha.svg"
    # (its fill is SVG's default black, so matplotlib leaves it out: the edge says it)
    assert svg_style(alpha_svg, "band-vanilla-0", "stroke") == expected["vanilla"]
    assert "vanilla ± std" in svg_texts(alpha_svg)


# ------------------------------------------------------------------------------ labels


def test_every_point_is_labelled_vanilla_included(tmp_path):
    groups = groups_of(tmp_path, {conv: 3 for conv in CONVS})
    figs = report.figures(groups)
    # accuracy: seeds 0..2 give 70 + seed + alpha * 10; the mean is over seeds 0, 1, 2.
    alpha_texts = sorted(a.get_text() for a in annotations(figs["accuracy_vs_alpha.png"]))
    assert alpha_texts == sorted(["73.50", "76.00"] * 2 + ["vanilla 71.00"])
    speed_texts = sorted(a.get_text() for a in annotations(figs["throughput_vs_alpha.png"]))
    assert speed_texts == sorted(["174", "176"] * 2 + ["vanilla 171"])
    for name, distinct in ((report.PLOTS[2], 5), (report.PLOTS[3], 3)):
        texts = sorted(a.get_text() for a in annotations(figs[name]))
        assert texts == sorted(["α=0.25", "α=0.5"] * 2 + ["vanilla"]), name
        # Each label points at a configuration's point (octave and multi-octave train as fast
        # as each other here: their points coincide, each keeps its label).
        points = {(round(a.xy[0], 6), round(a.xy[1], 6)) for a in annotations(figs[name])}
        assert len(points) == distinct, name
    report.build_report(str(tmp_path), formats=["svg"], dpi=50)
    texts = svg_texts(tmp_path / "accuracy_vs_flops.svg")
    assert texts.count("α=0.25") == 2 and texts.count("vanilla") >= 2  # point and legend


def crowded_groups(tmp_path):
    """Twelve configurations whose points nearly coincide in the accuracy-vs-FLOPs figure
    (and a thirteenth far away, which sets the axes' scale), each label the same width."""
    for conv in ("octave", "multi-octave"):
        for i, alpha in enumerate((0.125, 0.25, 0.375, 0.5, 0.625, 0.75)):
            make_run(tmp_path, f"{conv},{alpha}/seed=0",
                     metrics(conv, alpha, acc=75.0 + 0.02 * i, flops_per_image=2.0e6 + 1e3 * i),
                     [f"conv={conv}", f"alpha={alpha}"])
    make_run(tmp_path, "vanilla/seed=0", metrics("vanilla", acc=60.0, flops_per_image=8e6),
             ["conv=vanilla"])
    return report.aggregate(report.find_runs(str(tmp_path)))


def test_labels_of_points_that_nearly_coincide_are_moved_apart(tmp_path):
    fig = report.figures(crowded_groups(tmp_path))["accuracy_vs_flops.png"]
    (ax,) = fig.axes
    renderer = labels.renderer_of(fig)
    anns = annotations(fig)
    assert len(anns) == 13
    fig.canvas.draw()  # as saved: positions the texts
    # The texts' boxes (an annotation's own extent includes its leader line).
    boxes = [Text.get_window_extent(a, renderer) for a in anns]
    anchors = [ax.transData.transform(a.xy) for a in anns]
    # The case is crowded: the points of the 12 close configurations lie within one label's
    # size of each other, so labels beside their points would pile up.
    close = [p for p, a in zip(anchors, anns) if a.get_text() != "vanilla"]
    spread = max(max(abs(p[0] - q[0]), abs(p[1] - q[1])) for p in close for q in close)
    assert spread < min(b.width for b in boxes)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (anns[i].get_text(), anns[j].get_text())
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(b.overlaps(legend) for b in boxes)
    frame = ax.get_window_extent(renderer)
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
               for b in boxes)
    # A label moved away from its point is joined to it.
    assert any(a.arrow_patch is not None for a in anns)
    # The same input, the same placement.
    again = annotations(report.figures(crowded_groups(tmp_path))["accuracy_vs_flops.png"])
    assert [a.xyann for a in again] == [a.xyann for a in anns]


def test_the_legend_stays_where_best_put_it_after_the_labels(tmp_path):
    fig = report.figures(crowded_groups(tmp_path))["accuracy_vs_flops.png"]
    (ax,) = fig.axes
    renderer = labels.renderer_of(fig)
    placed = ax.get_legend().get_window_extent(renderer)
    fig.canvas.draw()  # what savefig does: 'best' would be evaluated again here
    assert ax.get_legend().get_window_extent(renderer).bounds == pytest.approx(placed.bounds)


# ------------------------------------------------------------------------------ intervals


def test_the_t_interval_matches_a_hand_computed_value():
    # [1, 2, 3, 4]: sd = sqrt(5/3) = 1.290994, se = 0.645497, t(0.975, 3) = 3.182446.
    assert stats.ci95_half_width([1, 2, 3, 4]) == pytest.approx(2.0542603, abs=1e-6)
    assert stats.ci95_half_width([5.0]) is None and stats.ci95_half_width([]) is None
    assert stats.t_975(1) == pytest.approx(12.7062047)
    assert stats.t_975(30) == pytest.approx(2.0422725)
    # Beyond the table: above the normal quantile, below the table's last entry.
    assert stats.Z_975 < stats.t_975(31) < stats.t_975(30)
    assert stats.t_975(10 ** 6) == pytest.approx(1.959966, abs=1e-5)
    with pytest.raises(ValueError):
        stats.t_975(0)


def test_the_t_quantiles_agree_with_scipy():
    t = pytest.importorskip("scipy.stats").t
    for df in range(1, 301):
        assert stats.t_975(df) == pytest.approx(t.ppf(0.975, df), abs=1e-5), df


def test_the_interval_is_beside_the_std_in_the_csv_and_markdown(tmp_path):
    groups_of(tmp_path, {"vanilla": 3, "octave": 1})
    report.build_report(str(tmp_path), make_plots=False)
    rows = {(r["conv"], r["alpha"]): r for r in read_csv(tmp_path / "summary_by_config.csv")}
    vanilla = rows[("vanilla", "")]
    header = list(vanilla)
    assert header.index("test_accuracy_ci95") == header.index("test_accuracy_std") + 1
    # 70, 71, 72: sd 1, t(0.975, 2) = 4.302653 -> 4.302653 / sqrt(3).
    assert float(vanilla["test_accuracy_ci95"]) == pytest.approx(4.302652730 / math.sqrt(3))
    assert float(vanilla["train_images_per_second_ci95"]) == pytest.approx(2.4841377)
    assert rows[("octave", "0.25")]["test_accuracy_ci95"] == ""  # one seed: no interval
    md = (tmp_path / "summary.md").read_text()
    assert "| test accuracy % | 95 % CI |" in md
    assert "| 71.00 ± 1.00 | [68.52, 73.48] |" in md
    assert "| 72.50 | — |" in md


# ------------------------------------------------------------------------------ summary.tex


def test_summary_tex_is_a_booktabs_table_of_mean_std_and_interval(tmp_path):
    groups_of(tmp_path, {"vanilla": 3, "octave": 3})
    # A configuration whose names need escaping: an optimizer of the user's, a varying key.
    for seed in range(2):
        make_run(tmp_path, f"odd/seed={seed}",
                 metrics("octave", 0.5, seed=seed, acc=60.0 + 2 * seed, optimizer="my_opt&50%"),
                 ["conv=octave", "alpha=0.5", "optimizer=my_opt&50%", f"seed={seed}"])
    report.build_report(str(tmp_path), make_plots=False)
    tex = (tmp_path / "summary.tex").read_text()
    lines = [line.strip() for line in tex.splitlines()]
    assert lines.index(r"\toprule") < lines.index(r"\midrule") < lines.index(r"\bottomrule")
    assert r"\begin{tabular}{lrlrrrrr}" in lines  # conv, alpha, optimizer, n, 4 numbers
    assert lines[lines.index(r"\toprule") + 1] == (
        r"conv & $\alpha$ & optimizer & $n$ & test acc. (\%) & 95\,\% CI & MFLOPs & params \\")
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert body == [
        r"vanilla & -- & sgd & 3 & 71.00 $\pm$ 1.00 & [68.52, 73.48] & 3.80 & 12,346 \\",
        r"octave & 0.25 & sgd & 3 & 73.50 $\pm$ 1.00 & [71.02, 75.98] & 2.45 & 12,346 \\",
        r"octave & 0.5 & sgd & 3 & 76.00 $\pm$ 1.00 & [73.52, 78.48] & 2.10 & 12,346 \\",
        r"octave & 0.5 & my\_opt\&50\% & 2 & 61.00 $\pm$ 1.41 & [48.29, 73.71] & 2.10 & 12,346 \\"]
    (caption,) = [line for line in lines if line.startswith(r"\caption{")]
    assert r"model: seed\_cnn" in caption and r"\ensuremath{\pm} std over N=2-3 seeds" in caption
    # Balanced braces and no unescaped specials in the cells.
    assert tex.count("{") == tex.count("}")
    for line in body:
        cells = line[:-len(r" \\")].split(" & ")
        for cell in cells:
            assert not re.search(r"[&%_#]", re.sub(r"\\[&%_#]", "", cell)), cell
    assert "LaTeX table (booktabs) of the configurations: [summary.tex](summary.tex)." in \
        (tmp_path / "summary.md").read_text()


def test_latex_escapes_every_special_character():
    assert latex.escape(r"a_b&c%d$e#f{g}h~i^j\k") == (
        r"a\_b\&c\%d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k")
    assert latex.escape("α=0.5 ± 1") == r"\ensuremath{\alpha}=0.5 \ensuremath{\pm} 1"


# ------------------------------------------------------------------------------ settings


def test_report_settings_accept_the_formats_and_refuse_others_naming_them():
    assert report_settings(["png", "SVG", "png"], 300) == (("png", "svg"), 300)
    assert report_settings("pdf", 72) == (("pdf",), 72)
    with pytest.raises(ConfigError, match=r"^report.format=gif: is not a figure format; "
                                          r"expected some of png, pdf, svg$"):
        report_settings(["png", "gif"], 100)
    with pytest.raises(ConfigError, match="needs at least one of png, pdf, svg"):
        report_settings([], 100)
    for dpi in (0, 10, 5000, "high", True, 150.5):
        with pytest.raises(ConfigError,
                           match=r"^report.dpi=.*: must be an integer in \[50, 1200\]$"):
            report_settings(["png"], dpi)


def test_the_config_has_report_settings_and_validate_checks_them():
    cfg = compose_config("dataset=synthetic")
    assert list(cfg.report.format) == ["png", "pdf"] and cfg.report.dpi == 200
    validate(compose_config("dataset=synthetic", "report.format=[png,svg]", "report.dpi=300"),
             check_environment=False)
    validate(compose_config("dataset=synthetic", "report.format=svg"), check_environment=False)
    with pytest.raises(ConfigError, match="^report.format=tiff: is not a figure format"):
        validate(compose_config("dataset=synthetic", "report.format=[png,tiff]"),
                 check_environment=False)
    with pytest.raises(ConfigError, match=r"^report.dpi=20: must be an integer in \[50, 1200\]"):
        validate(compose_config("dataset=synthetic", "report.dpi=20"), check_environment=False)


def report_cli(*args):
    return run_python("-m", "octconv_exp.report", *args, timeout=300)


def test_the_report_command_takes_format_and_dpi_and_refuses_a_bad_one_in_one_line(tmp_path):
    groups_of(tmp_path, {"vanilla": 1, "octave": 1})
    out = report_cli(str(tmp_path), "--format", "png,bmp")
    assert out.returncode == 2
    assert out.stderr == "error: --format=bmp: is not a figure format; expected some of " \
        "png, pdf, svg\n"
    assert not os.path.exists(tmp_path / "summary.md")  # refused before writing anything
    out = report_cli(str(tmp_path), "--dpi", "many")
    assert (out.returncode, out.stderr) == (
        2, "error: --dpi=many: must be an integer in [50, 1200]\n")
    out = report_cli(str(tmp_path), "--format", "svg", "--dpi", "60")
    assert out.returncode == 0, out.stderr
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith((".png", ".pdf", ".svg"))) == \
        sorted(report.figure_files(["svg"]))


def test_without_flags_the_report_follows_the_sweeps_own_report_settings(tmp_path):
    config = {"conv": {"mode": "octave"}, "alpha": 0.5, "seed": 0,
              "report": {"format": ["svg", "png"], "dpi": 60}}
    sweep_dir = tmp_path / "sweep"
    make_run(sweep_dir, "a/seed=0", metrics("octave", 0.5), ["alpha=0.5"], config=config)
    assert report.sweep_report_settings(str(sweep_dir), report.find_runs(str(sweep_dir))) == \
        (("svg", "png"), 60)
    # A flag wins over the sweep's setting; a sweep without one gets the defaults.
    assert report.sweep_report_settings(str(sweep_dir), report.find_runs(str(sweep_dir)),
                                        formats="pdf") == (("pdf",), 60)
    other = tmp_path / "other"
    make_run(other, "a/seed=0", metrics("octave", 0.5), ["alpha=0.5"])
    assert report.sweep_report_settings(str(other), report.find_runs(str(other))) == \
        (("png", "pdf"), 200)
    # report.* overrides are not what a configuration is: runs with and without them group.
    make_run(sweep_dir, "b/seed=1", metrics("octave", 0.5, seed=1),
             ["alpha=0.5", "report.format=[svg]", "report.dpi=60"], config=dict(config, seed=1))
    (group,) = report.aggregate(report.find_runs(str(sweep_dir)))
    assert (group["config"], group["n"]) == ("alpha=0.5", 2)


@pytest.mark.slow
def test_a_real_sweep_writes_the_formats_of_report_format(tmp_path):
    sweep_dir = tmp_path / "s"
    res = run_cli("-m", "conv=vanilla,octave", "alpha=0.5", "report.format=[svg,pdf]",
                  "report.dpi=60", *SYNTHETIC_32_NO_SAVES, f"hydra.sweep.dir={sweep_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    written = sorted(n for n in os.listdir(sweep_dir) if n.endswith((".png", ".pdf", ".svg")))
    assert written == sorted(report.figure_files(["svg", "pdf"]))
    assert sorted(d for d in os.listdir(sweep_dir) if os.path.isdir(sweep_dir / d)) == [
        "conv=octave,alpha=0.5", "conv=vanilla"]  # the report's settings do not name the jobs
    for name in report.PLOTS[2:]:
        assert "vanilla" in svg_texts(sweep_dir / (name[:-4] + ".svg"))
    tex = (sweep_dir / "summary.tex").read_text()
    assert r"\toprule" in tex and "vanilla & -- & 1 &" in tex
    with open(sweep_dir / "summary_by_config.csv") as f:
        assert "test_accuracy_ci95" in next(csv.reader(f))
