"""What an evaluation pass records beyond top-1 accuracy: the confusion matrix of the
predictions (rows: the true class, columns: the predicted one), the top-k accuracy and the
accuracy of each class, and the files a run dir holds of them.

The matrix counts the very predictions the top-1 accuracy counts (``argmax`` of the outputs
that came back, against the labels aligned on their last rows, as ``loop.count_correct``
does): its trace is the number of correct predictions. Data-parallel ranks each count their
part of the set; :meth:`ConfusionMatrix.sums` and :meth:`ConfusionMatrix.set_sums` carry the
counts through the same sum over ranks as the other counts, so the matrix counts every image
of the set once.
"""
import csv
import io
import logging
import os
from typing import List, Optional

import torch

from ..config.schema import DEFAULT_CONFUSION_FORMATS, REPORT_FORMATS
from ..records.figures import save as save_figure
from ..records.outputs import write_text_atomic

log = logging.getLogger("octconv_exp")

CONFUSION_CSV = "confusion_matrix.csv"
#: The figure's file name without its format: confusion_matrix.png, .pdf, .svg.
CONFUSION_FIGURE = "confusion_matrix"
CONFUSION_PNG = CONFUSION_FIGURE + ".png"
#: The PNG figure's resolution (its size follows the number of classes).
CONFUSION_DPI = 100
PER_CLASS_CSV = "per_class_accuracy.csv"
#: metrics.json's test_top5_accuracy; only with more classes than this (with fewer, every
#: prediction is within the top 5).
TOP_K = 5
#: Above this many classes the figure's cells are too small to carry their count.
ANNOTATED_CLASSES = 40
#: Above this many classes the axes name no class (every name would overlap the next).
LABELLED_CLASSES = 120


class ConfusionMatrix:
    """Counts of (true class, predicted class) over the batches given to :meth:`update`, and
    how many of them had the true class among the ``top_k`` highest outputs."""

    def __init__(self, class_names: List[str], top_k: int = TOP_K):
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        if self.num_classes == 0:
            raise ValueError("a confusion matrix needs at least one class")
        self.top_k = top_k if self.num_classes > top_k else None
        self._counts = None  # on the host
        self._top_k_correct = None  # on the outputs' device until read

    def update(self, output, labels):
        """Count one batch: ``output`` (N x classes logits or log-probabilities) against the
        last N of ``labels``."""
        if output.dim() != 2 or output.shape[1] != self.num_classes:
            raise ValueError(f"outputs of shape {tuple(output.shape)}, expected "
                             f"(N, {self.num_classes})")
        n = output.shape[0]
        labels = labels[-n:].to(output.device).long()
        c = self.num_classes
        # Counted on the host, in place: CUDA's bincount is refused under deterministic
        # algorithms on some torch versions (atomicAdd), N predictions are a small copy, and
        # a C x C matrix per batch would be 8 MB at 1000 classes.
        truth, predicted = labels.cpu(), output.argmax(dim=1).cpu()
        if self._counts is None:
            self._counts = torch.zeros((c, c), dtype=torch.int64)
        self._counts.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
        if self.top_k is not None:
            # float(): topk of half outputs (IPU) is not implemented on every torch's CPU.
            top = output.float().topk(self.top_k, dim=1).indices
            hits = (top == labels[:, None]).any(dim=1).sum()
            self._top_k_correct = hits if self._top_k_correct is None \
                else self._top_k_correct + hits.to(self._top_k_correct.device)

    @property
    def counts(self):
        """The matrix as a host int64 tensor (rows: true class, columns: predicted)."""
        if self._counts is None:
            return torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)
        return self._counts.detach().cpu().long()

    @property
    def top_k_correct(self):
        return 0 if self._top_k_correct is None else int(self._top_k_correct.item())

    # -- merging ----------------------------------------------------------------------------
    def sums(self):
        """The counts as a flat list of numbers, for a sum over ranks (every count, then the
        top-k hits)."""
        return self.counts.flatten().tolist() + [self.top_k_correct]

    def set_sums(self, values):
        """Take the counts back from :meth:`sums`'s layout (summed over ranks). Floats are
        exact here: a sum over ranks in float64 is exact for counts below 2**53."""
        c = self.num_classes
        if len(values) != c * c + 1:
            raise ValueError(f"{len(values)} sums for a {c}x{c} matrix and its top-k count")
        self._counts = torch.tensor([int(round(v)) for v in values[:-1]],
                                    dtype=torch.int64).reshape(c, c)
        self._top_k_correct = torch.tensor(int(round(values[-1])), dtype=torch.int64)

    def merge(self, other):
        """Add ``other``'s counts (the same classes) to these."""
        if other.class_names != self.class_names or other.top_k != self.top_k:
            raise ValueError("only matrices of the same classes and top-k merge")
        self.set_sums([a + b for a, b in zip(self.sums(), other.sums())])
        return self

    # -- what it says -----------------------------------------------------------------------
    @property
    def total(self):
        return int(self.counts.sum())

    @property
    def correct(self):
        return int(self.counts.trace())

    def accuracy(self):
        """Top-1 accuracy in percent, as loop.evaluate computes it (None: nothing counted)."""
        total = self.total
        return 100.0 * self.correct / total if total else None

    def top_k_accuracy(self):
        """Top-k accuracy in percent (None: nothing counted, or no more classes than k)."""
        total = self.total
        if self.top_k is None or not total:
            return None
        return 100.0 * self.top_k_correct / total

    def per_class(self):
        """``[(class name, images of that class, of them predicted right, accuracy in percent
        or None for a class with no image)]`` in class order."""
        counts = self.counts
        rows = []
        for k, name in enumerate(self.class_names):
            n, ok = int(counts[k].sum()), int(counts[k, k])
            rows.append((name, n, ok, 100.0 * ok / n if n else None))
        return rows

    def per_class_accuracy(self):
        """``{class name: accuracy in percent (None: no image of that class)}``."""
        return {name: accuracy for name, _, _, accuracy in self.per_class()}

    # -- files ------------------------------------------------------------------------------
    def confusion_csv(self):
        """The matrix as CSV text: a header of the predicted classes' names, then one row per
        true class, led by its name."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["true \\ predicted"] + self.class_names)
        for name, row in zip(self.class_names, self.counts.tolist()):
            writer.writerow([name] + row)
        return buf.getvalue()

    def per_class_csv(self):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["class", "images", "correct", "accuracy"])
        for name, n, ok, accuracy in self.per_class():
            writer.writerow([name, n, ok, "" if accuracy is None else repr(accuracy)])
        return buf.getvalue()

    def figure(self, title: Optional[str] = None):
        """The matrix as a matplotlib Figure: each row coloured by the fraction of that true
        class predicted as each class (so rare and common classes read alike), each cell
        carrying its count."""
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        counts = self.counts
        c = self.num_classes
        rows = counts.sum(dim=1, keepdim=True).clamp(min=1)
        fraction = (counts.double() / rows.double()).numpy()
        cell = 0.45 if c <= ANNOTATED_CLASSES else 0.12  # inches: a count fits, or a name
        grid = min(max(2.5, cell * c), 30.0)
        # Margins for the class names (about 0.09 inch a character at 10 points) instead of
        # tight_layout, which draws the whole figure once more to measure them.
        longest = max(len(n) for n in self.class_names) if c <= LABELLED_CLASSES else 0
        left = 0.8 + 0.09 * longest
        bottom = 0.8 + (0.065 if c <= ANNOTATED_CLASSES else 0.08) * longest  # 45 or 90 deg
        width, height = left + grid + 1.4, bottom + grid + 0.5
        fig = Figure(figsize=(width, height))
        ax = fig.add_axes([left / width, bottom / height, grid / width, grid / height])
        image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        bar = fig.add_axes([(left + grid + 0.2) / width, bottom / height, 0.2 / width,
                            grid / height])
        fig.colorbar(image, cax=bar, label="fraction of the true class's images")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        if c <= LABELLED_CLASSES:
            ax.set_xticks(range(c))
            ax.set_yticks(range(c))
            few = c <= ANNOTATED_CLASSES
            names = 10 if few else 7  # points: a name per 0.12-inch cell needs a small font
            ax.set_xticklabels(self.class_names, rotation=45 if few else 90, ha="right",
                               rotation_mode="anchor", fontsize=names)
            ax.set_yticklabels(self.class_names, fontsize=names)
        if c <= ANNOTATED_CLASSES:
            size = 9 if c <= 15 else 7
            table = counts.tolist()
            for i in range(c):
                for j in range(c):
                    # Dark text on light cells, white on dark ones.
                    ax.text(j, i, str(table[i][j]), ha="center", va="center",
                            fontsize=size, color="white" if fraction[i, j] > 0.5 else "black")
        accuracy = self.accuracy()
        ax.set_title(title or (f"{self.total} images, accuracy "
                               + ("n/a" if accuracy is None else f"{accuracy:.2f}%")))
        return fig


def write_outputs(matrix: ConfusionMatrix, output_dir, formats=DEFAULT_CONFUSION_FORMATS):
    """confusion_matrix.csv, per_class_accuracy.csv and (with matplotlib) the figure as
    confusion_matrix.<format> for each of ``formats`` (report.confusion_format; none for
    ``()``) in ``output_dir``, each written atomically; returns their paths.

    A figure of this run dir in a format not asked for now (an earlier pass of a resumed
    run drew it) shows counts this CSV no longer holds: it is removed, and the log says so."""
    written = []
    path = os.path.join(output_dir, CONFUSION_CSV)
    write_text_atomic(path, matrix.confusion_csv())
    written.append(path)
    path = os.path.join(output_dir, PER_CLASS_CSV)
    write_text_atomic(path, matrix.per_class_csv())
    written.append(path)
    for fmt in REPORT_FORMATS:
        stale = os.path.join(output_dir, f"{CONFUSION_FIGURE}.{fmt}")
        if fmt not in formats and os.path.isfile(stale):
            os.remove(stale)
            log.info("Removed %s: an earlier test pass drew it, and report.confusion_format "
                     "is %s now", os.path.basename(stale), "[" + ",".join(formats) + "]")
    if not formats:
        return written
    try:
        fig = matrix.figure()
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)",
                    ", ".join(f"{CONFUSION_FIGURE}.{f}" for f in formats))
        return written
    return written + save_figure(fig, os.path.join(output_dir, CONFUSION_FIGURE), formats,
                                 CONFUSION_DPI)
