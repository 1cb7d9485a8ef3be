"""The one training/evaluation loop every backend runs.

A training step may return the outputs of only part of the batch it consumed (PopTorch's
default output mode returns the last micro-batch): accuracy is computed over the outputs that
came back, against the matching (last) labels, and the image count is the full batch.
"""
import time
from dataclasses import dataclass

import math

import torch
from tqdm import tqdm

from .errors import Diverged


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    train_images: int
    train_seconds: float
    lr: float = float("nan")

    @property
    def train_images_per_second(self):
        return self.train_images / self.train_seconds if self.train_seconds > 0 else 0.0

    def as_row(self):
        return {"epoch": self.epoch, "train_loss": self.train_loss,
                "train_accuracy": self.train_accuracy, "train_images": self.train_images,
                "train_seconds": round(self.train_seconds, 4), "lr": self.lr,
                "train_images_per_second": round(self.train_images_per_second, 2)}


def count_correct(output, labels):
    """Correct predictions among the outputs returned; labels aligned on the last rows
    (PopTorch's default training output is the last micro-batch of the combined batch)."""
    labels = labels[-output.shape[0]:]
    return (output.argmax(dim=1) == labels).sum(), labels.shape[0]


def train_epoch(step, loader, epoch, epochs, progress_bar=True, refresh_every=25):
    """One pass over ``loader``; the loss and accuracy are summed on the device and read back
    only every ``refresh_every`` steps, so the bar never forces a synchronisation per step.

    A step may return no output (PopTorch's Sum output mode): the accuracy is then None.
    A non-finite loss raises :class:`Diverged`; host losses are checked every step, device
    losses at every read-back (so the step reported is the first check that saw it)."""
    loss_sum = None
    correct = None
    seen = 0  # predictions returned
    images = 0  # images consumed
    steps = 0
    bar = tqdm(loader, total=len(loader), desc=f"Epoch {epoch}/{epochs}", disable=not progress_bar,
               leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    for data, labels in bar:
        output, loss = step(data, labels)
        loss = loss.detach().float().mean()
        loss_sum = loss if loss_sum is None else loss_sum + loss
        if output is not None:
            ok, n = count_correct(output, labels)
            correct = ok if correct is None else correct + ok
            seen += n
        images += data.shape[0]
        steps += 1
        on_host = loss_sum.device.type == "cpu"
        if on_host or steps % refresh_every == 0:
            running = loss_sum.item()
            if not math.isfinite(running):
                bar.close()
                raise Diverged(epoch, steps, loss.item())
            if progress_bar and steps % refresh_every == 0:
                bar.set_postfix_str(_describe(running / steps, correct, seen), refresh=False)
    if steps == 0:
        raise ValueError("the training loader yielded no batch")
    mean_loss = loss_sum.item() / steps
    if not math.isfinite(mean_loss):
        bar.close()
        raise Diverged(epoch, steps, mean_loss)
    accuracy = 100.0 * correct.item() / seen if seen else None
    elapsed = time.perf_counter() - start
    if progress_bar:
        bar.set_postfix_str(_describe(mean_loss, correct, seen))
    bar.close()
    return EpochStats(epoch, mean_loss, accuracy, images, elapsed)


def _describe(loss, correct, seen):
    text = f"loss {loss:.4f}"
    if seen:
        text += f" | accuracy {100.0 * correct.item() / seen:.2f}%"
    return text


def evaluate(infer, loader, progress_bar=True):
    """Accuracy (percent) over every image the loader yields, and how many that was."""
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for data, labels in tqdm(loader, total=len(loader), desc="Test", disable=not progress_bar,
                             leave=False, dynamic_ncols=True):
        output = infer(data)
        ok, n = count_correct(output, labels)
        correct += ok.cpu()
        seen += n
    if seen == 0:
        raise ValueError("the test loader yielded no batch")
    return 100.0 * correct.item() / seen, seen
