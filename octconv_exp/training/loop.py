"""The one training/evaluation loop every backend runs.

A training step may return the outputs of only part of the batch it consumed (PopTorch's
default output mode returns the last micro-batch): accuracy is computed over the outputs that
came back, against the matching (last) labels, and the image count is the full batch.

Nothing a step is given or returns is kept past that step: PopTorch's Async DataLoader hands
out slots of a ring buffer that it refills in place a few iterations later (poptorch 3.4,
python/_dataloader.py; docs/user_guide/batching.rst: "You must clone tensors at each
iteration if you wish to keep their references"). Each step is scored at once into a fresh
tensor (the number of correct predictions) and its loss is copied; only those are kept.
"""
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import Diverged

log = logging.getLogger("octconv_exp")


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    train_images: int
    train_seconds: float
    lr: float = float("nan")
    # On the validation split after the epoch (None without one): see :func:`evaluate`.
    val_loss: Optional[float] = None
    val_accuracy: Optional[float] = None

    @property
    def train_images_per_second(self):
        return self.train_images / self.train_seconds if self.train_seconds > 0 else 0.0

    def as_row(self):
        return {"epoch": self.epoch, "train_loss": self.train_loss,
                "train_accuracy": self.train_accuracy, "train_images": self.train_images,
                "train_seconds": round(self.train_seconds, 4), "lr": self.lr,
                "train_images_per_second": round(self.train_images_per_second, 2),
                "val_loss": self.val_loss, "val_accuracy": self.val_accuracy}


#: Which way is better by default for a monitor (trainer.early_stopping.monitor, one of the
#: schema's MONITORS; trainer.early_stopping.mode: max for these, min for losses).
HIGHER_IS_BETTER = ("val_accuracy", "test_accuracy")


def natural_mode(monitor):
    """``max`` for an accuracy, ``min`` for a loss."""
    return "max" if monitor in HIGHER_IS_BETTER else "min"


def improves(value, reference, mode, min_delta=0.0):
    """Whether ``value`` beats ``reference`` (None: nothing yet) by more than ``min_delta``
    in direction ``mode``; a tie is no improvement (Lightning's EarlyStopping rule)."""
    if reference is None:
        return True
    return value - min_delta > reference if mode == "max" else value + min_delta < reference


def best_epoch(epochs, monitor, mode=None):
    """The first epoch with the best value of ``monitor`` (ties keep the earlier epoch, as
    best.pt does), or None when no epoch has a value."""
    mode = mode or natural_mode(monitor)
    best = None
    for stats in epochs:
        value = getattr(stats, monitor)
        if value is not None and improves(value, None if best is None else getattr(best, monitor),
                                          mode):
            best = stats
    return best


def epochs_without_improvement(epochs, monitor, mode=None, min_delta=0.0):
    """Epochs completed since the last one that improved on the best value before it by more
    than ``min_delta`` (0: the last epoch did). As Lightning's EarlyStopping counts: an
    improvement smaller than ``min_delta`` neither resets the count nor moves the reference."""
    mode = mode or natural_mode(monitor)
    reference = last_improved = None
    for stats in epochs:
        value = getattr(stats, monitor)
        if value is not None and improves(value, reference, mode, min_delta):
            reference, last_improved = value, stats.epoch
    return 0 if last_improved is None else epochs[-1].epoch - last_improved


def should_stop_early(epochs, monitor, patience, mode=None, min_delta=0.0):
    """Early stopping's decision after the last of ``epochs``: ``patience`` epochs (None:
    never) without an improvement of ``monitor`` by more than ``min_delta``."""
    return patience is not None and bool(epochs) and \
        epochs_without_improvement(epochs, monitor, mode, min_delta) >= patience


def count_correct(output, labels):
    """Correct predictions among the outputs returned; labels aligned on the last rows
    (PopTorch's default training output is the last micro-batch of the combined batch)."""
    labels = labels[-output.shape[0]:]
    return (output.argmax(dim=1) == labels).sum(), labels.shape[0]


class EpochProgress:
    """How far an epoch got: steps done, the running sums (kept as the tensors they are, so an
    epoch resumed from a checkpoint sums exactly as an uninterrupted one), and the steps not
    yet folded into them (bookkeeping is batched every ``refresh_every`` steps).

    A pending step is ``(loss, correct, scored)``: its loss (a copy), the number of correct
    predictions among the outputs it returned (a tensor computed at that step, None when the
    step returned no outputs) and how many outputs that was."""

    def __init__(self, steps=0, loss_sum=None, correct=None, seen=0, images=0, seconds=0.0,
                 pending=None):
        self.steps, self.loss_sum, self.correct = steps, loss_sum, correct
        self.seen, self.images, self.seconds = seen, images, seconds
        self.pending = pending if pending is not None else []  # [(loss, correct, scored)]

    def add(self, loss, output, labels):
        """Record one step; copies what it keeps, so the step's tensors may be reused."""
        if output is None:
            correct, scored = None, 0
        else:
            correct, scored = count_correct(output, labels)
        # clone(): the loss may be an output buffer of the device or the loader's step.
        self.pending.append((loss.detach().clone(), correct, scored))

    def state_dict(self):
        def host(t):
            return None if t is None else t.detach().cpu()

        return {"steps": self.steps, "loss_sum": host(self.loss_sum), "correct": host(self.correct),
                "seen": self.seen, "images": self.images, "seconds": self.seconds,
                "pending": [(host(loss), host(correct), scored)
                            for loss, correct, scored in self.pending]}

    @classmethod
    def from_state_dict(cls, state, device=None):
        def dev(t):
            return None if t is None or device is None else t.to(device)

        pending = []
        for loss, second, third in state.get("pending", []):
            if isinstance(third, torch.Tensor):  # a checkpoint from before: (loss, output, labels)
                second, third = count_correct(second, third)
            pending.append((dev(loss), dev(second), int(third)))
        return cls(state["steps"], dev(state["loss_sum"]), dev(state["correct"]), state["seen"],
                   state["images"], state["seconds"], pending)

    def flush(self, epoch):
        """Fold the pending steps into the sums (a handful of ops for many steps), and raise
        :class:`Diverged` naming the first step whose loss was not finite."""
        if not self.pending:
            return
        first = self.steps - len(self.pending) + 1
        losses = [item[0] for item in self.pending]
        if any(loss.dim() for loss in losses):  # per-replica losses (IPU): one mean each
            losses = [loss.float().mean() for loss in losses]
        losses = torch.stack(losses).float()
        chunk = losses.sum()
        if not math.isfinite(chunk.item()):
            finite = torch.isfinite(losses)
            bad = int((~finite).nonzero()[0, 0]) if not bool(finite.all()) else len(losses) - 1
            raise Diverged(epoch, first + bad, losses[bad].item())
        self.loss_sum = chunk if self.loss_sum is None else self.loss_sum + chunk
        scored = [(correct, n) for _, correct, n in self.pending if correct is not None]
        if scored:
            ok = torch.stack([correct for correct, _ in scored]).sum()
            self.correct = ok if self.correct is None else self.correct + ok
            self.seen += sum(n for _, n in scored)
        self.pending = []


# A test hook: ``OCTCONV_EXP_SIGNAL_AT=point[*count]`` sends this process SIGINT (or
# ``OCTCONV_EXP_SIGNAL``) ``count`` times when the run reaches ``point``: "start-up" (data and
# model built), "step:K" (after the K-th training step this process ran), "evaluation" (after
# the first test batch) or "accuracy" (right after the final accuracy); with
# ``OCTCONV_EXP_SIGNAL_RANK=R``, only data-parallel rank R; with ``OCTCONV_EXP_SIGNAL_GROUP=1``, to
# the whole process group. Tests stop a run at an
# exact place with it instead of racing a timer; unset, it costs one comparison per step
# (the hooks are read once an epoch, not when this module is imported: a process that imported
# it before its environment was set, a fork server's child, sees its own).
_steps_run = 0


def _signal_at():
    return os.environ.get("OCTCONV_EXP_SIGNAL_AT", "").partition("*")


def send_test_signal(point):
    at, _, count = _signal_at()
    if at != point:
        return
    only = os.environ.get("OCTCONV_EXP_SIGNAL_RANK")  # data-parallel: signal one rank only
    if only is not None:
        from ..backends.distributed import WORLD  # read at call time: distributed rebinds WORLD

        if int(only) != WORLD.rank:
            return
    sig = getattr(signal, os.environ.get("OCTCONV_EXP_SIGNAL", "SIGINT"))
    for _ in range(int(count or 1)):
        if os.environ.get("OCTCONV_EXP_SIGNAL_GROUP"):  # as a terminal's Ctrl-C does
            os.killpg(os.getpgrp(), sig)
        else:
            os.kill(os.getpid(), sig)


# A second test hook: ``OCTCONV_EXP_PAUSE_AT=step:K`` holds the run after this process's K-th
# training step until the file ``OCTCONV_EXP_PAUSE_UNTIL`` exists or a stop is requested (a
# signal, a sweep's stop marker). Tests catch a sweep's jobs inside their epoch with it instead
# of training thousands of images to be sure the signal lands there.
_PAUSED = "Paused after step %d (OCTCONV_EXP_PAUSE_AT) until %s exists or a stop is requested"


def _test_hooks_set():
    return bool(_signal_at()[0]) or "OCTCONV_EXP_PAUSE_AT" in os.environ


def _after_step(should_stop=None):
    global _steps_run
    _steps_run += 1
    if _signal_at()[0]:
        send_test_signal(f"step:{_steps_run}")
    if os.environ.get("OCTCONV_EXP_PAUSE_AT") == f"step:{_steps_run}":
        until = os.environ.get("OCTCONV_EXP_PAUSE_UNTIL", "")
        log.info(_PAUSED, _steps_run, until)
        while not os.path.exists(until) and not (should_stop is not None and should_stop()):
            time.sleep(0.05)


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); ``progress`` is how far the epoch got."""

    def __init__(self, epoch, progress):
        super().__init__(f"interrupted at epoch {epoch}, step {progress.steps}")
        self.epoch = epoch
        self.progress = progress


def train_epoch(step, loader, epoch, epochs, progress_bar=True, refresh_every=25, resume=None,
                should_stop=None, reduce=None):
    """One pass over ``loader``. Per step only the step itself runs: losses and outputs are
    kept and folded into the epoch's sums every ``refresh_every`` steps (one synchronisation
    and a handful of ops for all of them), which also updates the bar and checks for
    divergence (:class:`Diverged` names the exact first step with a non-finite loss).

    A step may return no output (PopTorch's Sum output mode): the accuracy is then None.
    ``resume`` (an :class:`EpochProgress`) continues an epoch a checkpoint stopped inside (the
    loader must then skip the batches already done); ``should_stop()`` is asked after every
    step and ends the epoch with :class:`Interrupted`. ``reduce`` (data-parallel: a sum over
    the ranks) turns this process's sums into the run's: the loss is then the mean of every
    rank's step losses, the accuracy and image count those of all ranks' images."""
    p = resume or EpochProgress()
    total = len(loader) + p.steps
    bar = tqdm(loader, total=total, initial=p.steps, desc=f"Epoch {epoch}/{epochs}",
               disable=not progress_bar, leave=True, dynamic_ncols=True)
    start = time.perf_counter() - p.seconds
    hooks = _test_hooks_set()
    try:
        for data, labels in bar:
            output, loss = step(data, labels)
            p.add(loss, output, labels)  # scored now: data/labels may be reused buffers
            p.images += data.shape[0]
            p.steps += 1
            if hooks:
                _after_step(should_stop)
            if p.steps % refresh_every == 0:
                p.flush(epoch)
                if progress_bar:
                    bar.set_postfix_str(_describe(p.loss_sum.item() / p.steps, p.correct, p.seen),
                                        refresh=False)
            if should_stop is not None and should_stop() and p.steps < total:
                p.seconds = time.perf_counter() - start
                raise Interrupted(epoch, p)
        if p.steps == 0:
            raise ValueError("the training loader yielded no batch")
        p.flush(epoch)
    finally:
        bar.close()
    sums = [p.loss_sum.item(), p.steps, 0 if p.correct is None else p.correct.item(), p.seen,
            p.images]
    if reduce is not None:
        sums = reduce(sums)
    loss_sum, steps, correct, seen, images = sums
    accuracy = 100.0 * correct / seen if seen else None
    elapsed = time.perf_counter() - start
    return EpochStats(epoch, loss_sum / steps, accuracy, int(images), elapsed)


def _describe(loss, correct, seen):
    text = f"loss {loss:.4f}"
    if seen:
        text += f" | accuracy {100.0 * correct.item() / seen:.2f}%"
    return text


def evaluate(infer, loader, progress_bar=True, desc="Test", signal_point="evaluation",
             reduce=None, confusion=None):
    """``(accuracy, images, loss)``: the accuracy (percent) over every image the loader yields,
    how many that was, and the mean cross-entropy of the outputs against the labels.

    The model's outputs are log-probabilities (the seed's log_softmax) or logits; cross-entropy
    applies log_softmax, which leaves log-probabilities as they are, so this is the NLL of
    either. It is the plain cross-entropy, without the training loss's label smoothing, so
    that validation losses compare across ``trainer.label_smoothing``.
    ``signal_point``: the test hook's point after the first batch (None: none).
    ``reduce`` (data-parallel: a sum over the ranks, each evaluating its part of the set):
    the counts and the loss of the whole set. ``confusion`` (an
    :class:`~octconv_exp.training.evaluation.ConfusionMatrix`) counts the same predictions, summed
    over the ranks with the other counts."""
    correct = torch.zeros((), dtype=torch.int64)
    loss_sum = None
    seen = 0
    for data, labels in tqdm(loader, total=len(loader), desc=desc, disable=not progress_bar,
                             leave=False, dynamic_ncols=True):
        output = infer(data)
        ok, n = count_correct(output, labels)
        correct += ok.cpu()
        if confusion is not None:
            confusion.update(output, labels)
        # Summed on the device, read once at the end.
        batch_loss = F.cross_entropy(output.float(), labels[-n:].to(output.device),
                                     reduction="sum")
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        seen += n
        if signal_point is not None and seen == n and _signal_at()[0]:
            send_test_signal(signal_point)
    if seen == 0:
        raise ValueError(f"the {desc.lower()} loader yielded no batch")
    correct, loss_sum = correct.item(), loss_sum.item()
    if reduce is not None:
        extra = [] if confusion is None else confusion.sums()
        totals = reduce([correct, seen, loss_sum] + extra)
        correct, seen, loss_sum = totals[:3]
        seen = int(seen)
        if confusion is not None:
            confusion.set_sums(totals[3:])
    return 100.0 * correct / seen, seen, loss_sum / seen


def validate(backend, model, loader, progress_bar=True, reduce=None):
    """The validation split through the backend's inference path (as the test set goes):
    ``(accuracy, images, loss)`` as :func:`evaluate` gives them. The backend switches the
    model to inference and back (on IPUs: the training executable makes way for the
    inference one, see ``IpuBackend.validating``)."""
    with backend.validating(model) as infer:
        return evaluate(infer, loader, progress_bar=progress_bar, desc="Validation",
                        signal_point=None, reduce=reduce)
