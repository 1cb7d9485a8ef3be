"""Evaluation beyond top-1 (issue 29.1): the confusion matrix, top-5 and per-class accuracy of
the test set, their files in the run dir and their numbers in metrics.json, on every backend."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (DOUBLE, SYNTHETIC_96_TEST_53_ONE_EPOCH, compose_config, file_sha256,
                      only_error_line, read_metrics, run_cli)
from octconv_exp.config.schema import confusion_formats
from octconv_exp.errors import ConfigError
from octconv_exp.training.evaluation import (CONFUSION_CSV, CONFUSION_PNG, PER_CLASS_CSV, ConfusionMatrix,
                                    write_outputs)
from octconv_exp.training.loop import count_correct, evaluate


# --------------------------------------------------------------------------------------------
# The accumulator (fast)
def test_a_hand_computed_matrix():
    """Three classes, six images: the counts, top-2, per-class and files worked out by hand."""
    names = ["cat", "dog", "owl"]
    # Predicted (argmax): cat, dog, owl, owl, cat, owl; second highest: dog, cat, cat, dog, owl, dog
    output = torch.tensor([[3.0, 2.0, 1.0], [2.0, 3.0, 1.0], [2.0, 1.0, 3.0],
                           [1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 0, 2, 1, 2, 1])
    m = ConfusionMatrix(names, top_k=2)
    m.update(output[:4], labels[:4])
    m.update(output[4:], labels[4:])
    assert m.counts.tolist() == [[1, 1, 0],
                                 [0, 0, 2],
                                 [1, 0, 1]]
    assert (m.total, m.correct) == (6, 2)
    assert m.accuracy() == 100.0 * 2 / 6
    # In the top 2: rows 0 (cat in cat,dog), 1 (cat in dog,cat), 2, 3 (dog in owl,dog), 4 (owl
    # in cat,owl), 5 (dog in owl,dog): all six.
    assert m.top_k_correct == 6 and m.top_k_accuracy() == 100.0
    assert m.per_class() == [("cat", 2, 1, 50.0), ("dog", 2, 0, 0.0), ("owl", 2, 1, 50.0)]
    assert m.confusion_csv() == ("true \\ predicted,cat,dog,owl\n"
                                 "cat,1,1,0\n"
                                 "dog,0,0,2\n"
                                 "owl,1,0,1\n")
    assert m.per_class_csv() == ("class,images,correct,accuracy\n"
                                 "cat,2,1,50.0\n"
                                 "dog,2,0,0.0\n"
                                 "owl,2,1,50.0\n")


def test_a_class_without_images_has_no_accuracy_and_few_classes_no_top5():
    m = ConfusionMatrix(["a", "b", "c", "d", "e"])
    m.update(torch.eye(5)[[0, 1, 1]], torch.tensor([0, 1, 2]))
    assert m.top_k is None and m.top_k_accuracy() is None  # 5 classes: top-5 says nothing
    assert m.per_class_accuracy() == {"a": 100.0, "b": 100.0, "c": 0.0, "d": None, "e": None}
    assert m.per_class_csv().splitlines()[4] == "d,0,0,"


def numpy_confusion(scores, labels, classes):
    expected = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(expected, (labels, scores.argmax(axis=1)), 1)
    return expected


@pytest.mark.parametrize("classes", [7, 10, 100])
def test_against_numpy_on_random_batches(classes):
    """Random outputs in uneven batches: the matrix is numpy's count of (label, argmax), the
    top-5 hits numpy's, its trace loop.count_correct's, its rows the labels' counts."""
    gen = torch.Generator().manual_seed(classes)
    output = torch.randn(503, classes, generator=gen)
    labels = torch.randint(0, classes, (503,), generator=gen)
    m = ConfusionMatrix([f"c{k}" for k in range(classes)])
    for start in range(0, 503, 64):
        m.update(output[start:start + 64], labels[start:start + 64])
    scores, truth = output.numpy(), labels.numpy()
    expected = numpy_confusion(scores, truth, classes)
    assert np.array_equal(m.counts.numpy(), expected)
    top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    assert m.top_k_correct == int((top5 == truth[:, None]).any(axis=1).sum())
    assert m.correct == int(count_correct(output, labels)[0])
    assert np.array_equal(m.counts.sum(dim=1).numpy(), np.bincount(truth, minlength=classes))
    assert m.total == 503


def test_labels_are_aligned_on_the_last_rows_as_count_correct_aligns_them():
    """An output of the last N of a batch's images (PopTorch's last micro-batch) is scored
    against the last N labels."""
    output = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 0])
    m = ConfusionMatrix(["x", "y"])
    m.update(output, labels)
    assert m.counts.tolist() == [[1, 0], [0, 1]]
    assert m.correct == int(count_correct(output, labels)[0]) == 2


def test_ranks_sums_merge_into_the_whole_sets_matrix():
    """Counts of two parts, summed the way ranks sum (as floats, in sums()' layout), or
    merged: the matrix of the whole."""
    gen = torch.Generator().manual_seed(1)
    output = torch.randn(101, 10, generator=gen)
    labels = torch.randint(0, 10, (101,), generator=gen)
    names = [str(k) for k in range(10)]
    whole = ConfusionMatrix(names)
    whole.update(output, labels)
    parts = [ConfusionMatrix(names) for _ in range(2)]
    parts[0].update(output[:51], labels[:51])
    parts[1].update(output[51:], labels[51:])
    summed = [float(a) + float(b) for a, b in zip(parts[0].sums(), parts[1].sums())]
    reduced = ConfusionMatrix(names)
    reduced.set_sums(summed)
    assert torch.equal(reduced.counts, whole.counts)
    assert reduced.top_k_correct == whole.top_k_correct
    merged = parts[0].merge(parts[1])
    assert torch.equal(merged.counts, whole.counts)
    assert merged.top_k_accuracy() == whole.top_k_accuracy()


def test_wrong_output_width_is_refused():
    with pytest.raises(ValueError, match=r"expected \(N, 3\)"):
        ConfusionMatrix(["a", "b", "c"]).update(torch.zeros(4, 5), torch.zeros(4).long())


def test_evaluate_counts_the_very_predictions_its_accuracy_counts():
    """loop.evaluate with a matrix (and a two-rank sum simulated): its accuracy is the
    matrix's trace over its total, exactly; the reduced matrix is the whole set's."""
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(90, 10, generator=gen)
    labels = torch.randint(0, 10, (90,), generator=gen)
    batches = [(data[i:i + 32], labels[i:i + 32]) for i in range(0, 90, 32)]
    names = [str(k) for k in range(10)]
    m = ConfusionMatrix(names)
    accuracy, seen, loss = evaluate(lambda x: x, batches, progress_bar=False, confusion=m)
    assert seen == m.total == 90
    assert 100.0 * m.correct / m.total == accuracy
    assert loss == pytest.approx(F.cross_entropy(data, labels).item(), rel=1e-6)
    assert np.array_equal(m.counts.numpy(), numpy_confusion(data.numpy(), labels.numpy(), 10))

    other = ConfusionMatrix(names)  # "the other rank": the same batches again
    evaluate(lambda x: x, batches, progress_bar=False, confusion=other)
    twice = [v * 2 for v in other.sums()]

    def reduce(values):  # this rank's sums plus the other rank's
        mine = values[3:]
        assert mine == other.sums()
        return [2 * values[0], 2 * values[1], 2 * values[2]] + [float(v) for v in twice]

    doubled = ConfusionMatrix(names)
    accuracy2, seen2, _ = evaluate(lambda x: x, batches, progress_bar=False, reduce=reduce,
                                   confusion=doubled)
    assert seen2 == doubled.total == 180
    assert torch.equal(doubled.counts, 2 * m.counts)
    assert 100.0 * doubled.correct / doubled.total == accuracy2 == accuracy


def test_the_files_name_the_classes(tmp_path):
    names = ["air, plane", "auto", "bird", "cat", "deer", "dog"]
    gen = torch.Generator().manual_seed(3)
    m = ConfusionMatrix(names)
    m.update(torch.randn(40, 6, generator=gen), torch.randint(0, 6, (40,), generator=gen))
    written = write_outputs(m, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(
        [CONFUSION_CSV, PER_CLASS_CSV, CONFUSION_PNG])
    with open(tmp_path / CONFUSION_CSV, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == names and [r[0] for r in rows[1:]] == names  # a comma survives
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == m.counts.tolist()
    from PIL import Image

    with Image.open(tmp_path / CONFUSION_PNG) as image:
        width, height = image.size
    assert width > 400 and height > 400
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left


def six_class_matrix():
    gen = torch.Generator().manual_seed(3)
    m = ConfusionMatrix(["air", "auto", "bird", "cat", "deer", "dog"])
    m.update(torch.randn(40, 6, generator=gen), torch.randint(0, 6, (40,), generator=gen))
    return m


def test_the_figure_is_written_in_each_format_asked_for_and_vector_files_repeat(tmp_path):
    m = six_class_matrix()
    written = write_outputs(m, str(tmp_path), ("svg", "pdf"))
    assert [os.path.basename(p) for p in written] == [
        CONFUSION_CSV, PER_CLASS_CSV, "confusion_matrix.svg", "confusion_matrix.pdf"]
    assert not (tmp_path / CONFUSION_PNG).exists()
    svg = (tmp_path / "confusion_matrix.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and svg.rstrip().endswith("</svg>")
    assert ">auto<" in svg.replace("\n", "")  # text kept as text (svg.fonttype none)
    pdf = (tmp_path / "confusion_matrix.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    again = tmp_path / "again"
    again.mkdir()
    write_outputs(m, str(again), ("svg", "pdf"))
    for name in ("confusion_matrix.svg", "confusion_matrix.pdf"):  # no dates, fixed ids
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes()


def test_no_figure_leaves_the_csvs_and_removes_an_earlier_passs_figure(tmp_path, caplog):
    m = six_class_matrix()
    write_outputs(m, str(tmp_path), ("png", "svg"))
    assert (tmp_path / CONFUSION_PNG).exists() and (tmp_path / "confusion_matrix.svg").exists()
    caplog.set_level("INFO", logger="octconv_exp")
    written = write_outputs(m, str(tmp_path), ("svg",))
    assert [os.path.basename(p) for p in written] == [CONFUSION_CSV, PER_CLASS_CSV,
                                                      "confusion_matrix.svg"]
    # The PNG of the earlier pass would show counts the CSV may no longer hold.
    assert not (tmp_path / CONFUSION_PNG).exists()
    assert "Removed confusion_matrix.png" in caplog.text
    assert [os.path.basename(p) for p in write_outputs(m, str(tmp_path), ())] == [
        CONFUSION_CSV, PER_CLASS_CSV]
    assert sorted(os.listdir(tmp_path)) == [CONFUSION_CSV, PER_CLASS_CSV]


@pytest.mark.parametrize("value, formats", [
    (None, ("png",)),  # the shipped default, composed
    ("[]", ()),
    ("[svg,PNG,svg]", ("svg", "png")),
    ("pdf", ("pdf",)),
])
def test_confusion_format_composes_to_the_formats(value, formats):
    cfg = compose_config(*([] if value is None else [f"report.confusion_format={value}"]))
    assert confusion_formats(cfg) == formats


@pytest.mark.parametrize("value, message", [
    ("[jpg]", "report.confusion_format=jpg: is not a figure format; expected some of png, "
              "pdf, svg, or [] for none"),
    ("null", "report.confusion_format=None: expected some of png, pdf, svg, or [] for none"),
    ("3", "report.confusion_format=3: expected some of png, pdf, svg, or [] for none"),
])
def test_a_wrong_confusion_format_is_one_config_error(value, message):
    cfg = compose_config(f"report.confusion_format={value}")
    with pytest.raises(ConfigError) as error:
        confusion_formats(cfg)
    assert str(error.value) == message


def test_a_config_saved_before_confusion_format_existed_draws_a_png():
    from omegaconf import OmegaConf

    assert confusion_formats(OmegaConf.create({"report": {"format": ["png"], "dpi": 200}})) \
        == ("png",)
    assert confusion_formats(OmegaConf.create({})) == ("png",)


# --------------------------------------------------------------------------------------------
# End to end (run.py)


def read_run(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, CONFUSION_CSV), newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    assert [r[0] for r in rows[1:]] == names
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)
    with open(os.path.join(run_dir, PER_CLASS_CSV), newline="") as f:
        per_class = list(csv.DictReader(f))
    return metrics, names, counts, per_class


def check_consistent(metrics, counts, per_class, names):
    """What the files and metrics.json say of one another."""
    assert counts.sum() == metrics["test_samples"]
    # Top-1 is the same count: the trace over the total, by the formula of test_accuracy.
    assert 100.0 * int(np.trace(counts)) / int(counts.sum()) == metrics["test_accuracy"]
    assert [r["class"] for r in per_class] == names == list(metrics["test_per_class_accuracy"])
    for k, row in enumerate(per_class):
        assert int(row["images"]) == counts[k].sum() and int(row["correct"]) == counts[k, k]
        expected = 100.0 * counts[k, k] / counts[k].sum()
        assert float(row["accuracy"]) == expected
        assert metrics["test_per_class_accuracy"][names[k]] == expected


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("evaluation") / "run")
    # Named: the tests' runs draw no figure unless they ask (conftest.CONFUSION_FIGURES).
    result = run_cli(*SYNTHETIC_96_TEST_53_ONE_EPOCH, f"hydra.run.dir={run_dir}",
                     "report.confusion_format=[png,svg]")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.sdk
def test_a_run_dir_holds_the_confusion_matrix_of_its_test_set(trained):
    from octconv_exp import load_model
    from octconv_exp.data.loading import load_data

    metrics, names, counts, per_class = read_run(trained)
    test = load_data(compose_config(*SYNTHETIC_96_TEST_53_ONE_EPOCH).dataset).test
    assert names == [str(c) for c in test.classes] and len(names) == 10
    check_consistent(metrics, counts, per_class, names)
    assert metrics["test_samples"] == 53
    # Rows are the true classes: the test set's own count of each label.
    assert counts.sum(axis=1).tolist() == np.bincount(test.labels.numpy(), minlength=10).tolist()
    # The numbers again, from the saved model through the public API and numpy.
    scores = load_model(trained).scores(test.images).float()
    truth = test.labels
    assert np.array_equal(counts, numpy_confusion(scores.numpy(), truth.numpy(), 10))
    top5 = scores.topk(5, dim=1).indices
    assert metrics["test_top5_accuracy"] == pytest.approx(
        100.0 * (top5 == truth[:, None]).any(dim=1).sum().item() / 53)
    assert metrics["test_top5_accuracy"] >= metrics["test_accuracy"]
    # The plain cross-entropy, as val_loss is.
    assert metrics["test_loss"] == pytest.approx(F.cross_entropy(scores, truth).item(),
                                                 rel=1e-5)
    assert os.path.getsize(os.path.join(trained, CONFUSION_PNG)) > 1000
    with open(os.path.join(trained, "confusion_matrix.svg")) as f:
        assert f.read().rstrip().endswith("</svg>")


@pytest.mark.slow
def test_evaluating_the_saved_model_gives_the_same_matrix(trained, tmp_path):
    out = str(tmp_path / "evaluated")
    # The command's figure formats, not the checkpoint's config's.
    result = run_cli("train=false", f"ckpt_path={trained}", f"hydra.run.dir={out}",
                     "report.confusion_format=[pdf]")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, names, counts, per_class = read_run(out)
    check_consistent(metrics, counts, per_class, names)
    first, first_names, first_counts, _ = read_run(trained)
    assert metrics["status"] == "evaluated"
    assert names == first_names and np.array_equal(counts, first_counts)
    assert metrics["test_per_class_accuracy"] == first["test_per_class_accuracy"]
    assert metrics["test_top5_accuracy"] == first["test_top5_accuracy"]
    assert metrics["test_loss"] == pytest.approx(first["test_loss"], rel=1e-6)
    assert sorted(f for f in os.listdir(out) if f.startswith("confusion_matrix.")) == [
        "confusion_matrix.csv", "confusion_matrix.pdf"]


@pytest.mark.slow
def test_a_resumed_run_may_change_its_figures_and_keeps_none_stale(tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_cli(*SYNTHETIC_96_TEST_53_ONE_EPOCH, f"hydra.run.dir={run_dir}",
                    "report.confusion_format=[png]")
    assert first.returncode == 0, first.stderr[-3000:]
    assert os.path.isfile(os.path.join(run_dir, CONFUSION_PNG))
    # A figure format cannot change the results: a resumed run may change it.
    again = run_cli("resume=true", "trainer.epochs=2", f"hydra.run.dir={run_dir}",
                    "report.confusion_format=[svg]")
    assert again.returncode == 0, again.stderr[-3000:]
    metrics, names, counts, per_class = read_run(run_dir)
    assert metrics["epochs_completed"] == 2
    check_consistent(metrics, counts, per_class, names)
    # The first pass's PNG showed the first epoch's counts: gone, the SVG is this pass's.
    assert sorted(f for f in os.listdir(run_dir) if f.startswith("confusion_matrix.")) == [
        "confusion_matrix.csv", "confusion_matrix.svg"]
    before = {f: file_sha256(os.path.join(run_dir, f)) for f in (
        "metrics.json", CONFUSION_CSV, "confusion_matrix.svg", "checkpoints/last.pt")}
    wrong = run_cli("resume=true", "trainer.epochs=3", f"hydra.run.dir={run_dir}",
                    "report.confusion_format=[jpg]")
    assert wrong.returncode == 2
    assert only_error_line(wrong.stderr) == (
        "error: report.confusion_format=jpg: is not a figure format; expected some of png, pdf, "
        "svg, or [] for none")
    assert read_metrics(run_dir)["epochs_completed"] == 2  # nothing of the run changed
    assert {f: file_sha256(os.path.join(run_dir, f)) for f in before} == before


@pytest.mark.slow
@pytest.mark.sdk
def test_the_ipu_path_counts_every_test_image_once(tmp_path):
    """On the PopTorch double with 2 replicas x 3 device iterations: outputs come back for
    whole combined batches of 60 and a padded tail; the matrix counts each of the 437 test
    images once, and the model evaluated on the CPU gives the same matrix."""
    run_dir = str(tmp_path / "ipu")
    args = ["dataset=synthetic", "dataset.train_size=240", "dataset.test_size=437",
            "trainer.epochs=1", "trainer.batch_size=8", "trainer.test_batch_size=10",
            "trainer.progress_bar=false", "ipu.num_workers=0"]
    result = run_cli("device=ipu", *args, "ipu.replicas=2", "ipu.device_iterations=3",
                     f"hydra.run.dir={run_dir}",
                     env={"PYTHONPATH": DOUBLE, "POPTORCH_DOUBLE_IPUS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, names, counts, per_class = read_run(run_dir)
    assert metrics["device"] == "ipu" and metrics["test_samples"] == 437
    check_consistent(metrics, counts, per_class, names)
    from octconv_exp.data.loading import load_data

    test = load_data(compose_config(*args).dataset).test
    assert counts.sum(axis=1).tolist() == np.bincount(test.labels.numpy(), minlength=10).tolist()
    cpu = str(tmp_path / "cpu")
    result = run_cli("train=false", f"ckpt_path={run_dir}", "device=cpu",
                     f"hydra.run.dir={cpu}")
    assert result.returncode == 0, result.stderr[-3000:]
    _, _, cpu_counts, _ = read_run(cpu)
    assert np.array_equal(counts, cpu_counts)
