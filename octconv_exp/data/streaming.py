"""Image folders streamed from disk: the images are decoded by DataLoader worker processes,
batch by batch, instead of being held in memory as one uint8 tensor.

:func:`scan_image_folder` lists root/<split>/<class>/** exactly as
:func:`~octconv_exp.data.loading.load_image_folder` reads it (same classes, same file order, same
errors), without decoding anything: a :class:`FileSet`. :class:`StreamingLoader` is a drop-in
replacement for :class:`~octconv_exp.data.datasets.BatchLoader` over such a set: the same seeded order,
the same global batches and data-parallel shards, the same resumption inside a pass, and
(without augmentation) byte for byte the same normalised batches as ``BatchLoader`` over the
decoded :class:`~octconv_exp.data.datasets.ImageSet`. Only the decoding moves: each pass's batches go
to a ``torch.utils.data.DataLoader`` as its ``batch_sampler``, over a torchvision
``ImageFolder`` whose loader decodes as ``_read_image`` does, and the collated uint8 batch is
normalised on the training device as ``BatchLoader`` normalises it.

With ``augment`` the worker crops and flips each image ImageNet-style
(``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` on the image at its
original size, then a horizontal flip with probability 1/2), with the randomness of a
generator seeded by (``augment_seed``, the pass number, the sample's position in the pass):
the same whatever the number of workers, and the same when a pass is resumed.
"""
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, UserError
from .datasets import (
    IMAGE_EXTENSIONS,
    IMAGE_SIZE,
    BatchLoader,
    ImageSet,
    _image_files,
    _read_image,
    derived_seed,
    global_batch,
    shard_of,
    split_validation,
)
from .decoding import DecodeFailure, crop_params, decode_image



# --------------------------------------------------------------------------------------------
# The files


@dataclass
class FileSet:
    """The file-level twin of :class:`~octconv_exp.data.datasets.ImageSet`: (path, class index) pairs
    in the order ``load_image_folder`` decodes them, nothing decoded."""
    samples: List[Tuple[str, int]]
    classes: List[str]
    image_size: int = IMAGE_SIZE
    root: str = ""  # the folder scanned (the ImageFolder's root)

    def __len__(self):
        return len(self.samples)

    @property
    def labels(self):
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def part(self, rank, world_size):
        """This rank's contiguous part (as ``ImageSet.part``: data-parallel evaluation)."""
        if world_size == 1:
            return self
        index = shard_of(torch.arange(len(self)), rank, world_size).tolist()
        return FileSet(samples=[self.samples[i] for i in index], classes=list(self.classes),
                       image_size=self.image_size, root=self.root)

    def dataset(self, augment=False, augment_seed=0):
        """The torchvision ImageFolder the DataLoader workers index."""
        # Deferred: importing torchvision imports torch._dynamo on torch 2.1+ (seconds in
        # every fresh process: a torchrun rank, a joblib worker); only a streamed folder
        # needs it.
        from .imagefolder import ImageFileFolder
        return ImageFileFolder(self, augment=augment, augment_seed=augment_seed)


def scan_image_folder(folder, classes: Optional[List[str]] = None, image_size=IMAGE_SIZE):
    """The files under folder/<class>/ (nested folders included) that
    :func:`~octconv_exp.data.loading.load_image_folder` would decode, in its order and with its
    errors (a class folder without images: an error for a training set, a warning for a test
    set), as a :class:`FileSet`."""
    if not os.path.isdir(folder):
        raise UserError(f"image folder {os.path.abspath(folder)} does not exist; dataset.root "
                        "must hold train/<class>/* and test/<class>/*")
    found = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"image folder {os.path.abspath(folder)} has no class subfolders; "
                        "expected <class>/<image> files")
    training = classes is None
    if training:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(f"image folder {os.path.abspath(folder)} has classes not in the "
                            f"training set: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}
    samples, empty = [], []
    for name in found:
        files = _image_files(os.path.join(folder, name),
                             other_classes=[os.path.join(folder, n) for n in found if n != name])
        if not files:
            empty.append(name)
        samples.extend((path, index[name]) for path in files)
    if not samples:
        raise UserError(f"image folder {os.path.abspath(folder)} holds no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        where = ", ".join(os.path.join(os.path.abspath(folder), name) for name in empty)
        if training:
            raise UserError(f"class folder{'s' if len(empty) > 1 else ''} without images "
                            f"({', '.join(IMAGE_EXTENSIONS)}): {where}; remove "
                            f"{'them' if len(empty) > 1 else 'it'} or add images")
        print(f"warning: test class folder{'s' if len(empty) > 1 else ''} without images: "
              f"{where}", file=sys.stderr)
    return FileSet(samples=samples, classes=list(classes), image_size=int(image_size),
                   root=os.path.abspath(folder))


def split_files(files: FileSet, val_size, seed):
    """``(rest, val)`` as :func:`~octconv_exp.data.datasets.split_validation` splits the decoded set:
    the same generator, the same held-out images (``val`` None for 0), the same errors."""
    n = len(files)
    # split_validation itself, on a stand-in whose "images" are the positions 0..n-1.
    rest, val = split_validation(ImageSet(images=torch.arange(n), labels=files.labels,
                                          classes=list(files.classes)), val_size, seed)
    if val is None:
        return files, None

    def part(positions):
        return FileSet(samples=[files.samples[i] for i in positions.tolist()],
                       classes=list(files.classes), image_size=files.image_size, root=files.root)

    return part(rest.images), part(val.images)


# --------------------------------------------------------------------------------------------
# Decoding (in the DataLoader workers)


def decode_files(files: FileSet) -> ImageSet:
    """Every image of ``files`` decoded into memory: the :class:`ImageSet` ``load_image_folder``
    returns for the same folder (an image folder that fits in memory)."""
    images = np.stack([_read_image(path, files.image_size) for path, _ in files.samples])
    return ImageSet(images=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                    labels=files.labels, classes=list(files.classes))


def collate_images(items, image_size):
    """(uint8 images (B, 3, S, S), int64 labels (B,)), or the first DecodeFailure."""
    for item in items:
        if isinstance(item, DecodeFailure):
            return item
    if not items:  # a rank's empty shard of a last, small global batch
        return (torch.empty(0, 3, image_size, image_size, dtype=torch.uint8),
                torch.empty(0, dtype=torch.int64))
    return torch.utils.data.default_collate(items)


def collate_sums(items):
    """A batch's exact per-channel pixel count, sum and sum of squares (int64), or the first
    DecodeFailure: what :func:`file_stats` adds up, computed in the worker."""
    for item in items:
        if isinstance(item, DecodeFailure):
            return item
    x = torch.stack([image for image, _ in items]).to(torch.int64)
    return (x.shape[0] * x.shape[2] * x.shape[3], x.sum(dim=(0, 2, 3)),
            (x * x).sum(dim=(0, 2, 3)))


def _raise_failure(batch):
    if isinstance(batch, DecodeFailure):
        raise UserError(batch.message)


def _loader_kwargs(workers, seed):
    """DataLoader arguments shared by the loaders here: a generator of their own (the global
    torch RNG is left alone, as BatchLoader leaves it), worker processes when asked."""
    kwargs = dict(num_workers=int(workers),
                  generator=torch.Generator().manual_seed(derived_seed("loader", seed)))
    if int(workers) > 0:
        kwargs.update(prefetch_factor=2)
    return kwargs


# --------------------------------------------------------------------------------------------
# Statistics and the in-memory choice


def stats_sample(n, sample, seed):
    """The positions :func:`file_stats` reads: all ``n`` when ``n <= sample``, else ``sample``
    of them drawn by a generator seeded from ``seed``, in increasing order."""
    if n <= sample:
        return list(range(n))
    gen = torch.Generator().manual_seed(derived_seed("statistics", seed))
    return torch.randperm(n, generator=gen)[:int(sample)].sort().values.tolist()


def file_stats(files: FileSet, sample=10000, seed=0, workers=2, batch_size=256):
    """Per-channel mean and std of the images scaled to [0, 1], as
    :meth:`ImageSet.channel_stats` computes them (std with Bessel's correction over all the
    pixels, clamped at 1e-6): over every image when there are at most ``sample``, else over
    ``sample`` images drawn by a generator seeded from ``seed``. Decoded by ``workers``
    DataLoader worker processes; the sums are exact integers."""
    index = stats_sample(len(files), sample, seed)
    batches = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
    loader = torch.utils.data.DataLoader(files.dataset(), batch_sampler=batches,
                                         collate_fn=collate_sums, **_loader_kwargs(workers, seed))
    count, total, squares = 0, [0, 0, 0], [0, 0, 0]
    for batch in loader:
        _raise_failure(batch)
        count += batch[0]
        for c in range(3):
            total[c] += int(batch[1][c])
            squares[c] += int(batch[2][c])
    mean = tuple(total[c] / (255.0 * count) for c in range(3))
    # Exact integers up to the one division: var = (N * sum(x^2) - sum(x)^2) / (N (N - 1)).
    var = [(count * squares[c] - total[c] * total[c]) / (count * (count - 1) * 255.0 ** 2)
           if count > 1 else float("nan") for c in range(3)]
    std = tuple(max(math.sqrt(v), 1e-6) if v == v else v for v in var)
    return mean, std


def decoded_bytes(n_images, image_size):
    """Bytes of ``n_images`` decoded as 3 x image_size x image_size uint8 images."""
    return int(n_images) * 3 * int(image_size) * int(image_size)


def _size_text(nbytes):
    gib = nbytes / 2 ** 30
    return f"{gib:.2f} GiB" if gib >= 0.01 else f"{nbytes / 2 ** 20:.2f} MiB"


def choose_in_memory(setting, n_images, image_size, max_memory_gb):
    """``(in_memory, reason)`` for ``dataset.in_memory`` (true, false or auto; strings or
    bools): auto streams from disk when the decoded uint8 images would exceed
    ``max_memory_gb`` GiB. ``reason`` is a short phrase for the log naming the size."""
    text = str(setting).strip().lower()
    size = decoded_bytes(n_images, image_size)
    if text == "true":
        return True, f"dataset.in_memory=true: in memory (decoded size {_size_text(size)})"
    if text == "false":
        return False, (f"dataset.in_memory=false: streamed from disk (decoded size "
                       f"{_size_text(size)})")
    if text != "auto":
        raise ConfigError("dataset.in_memory", setting, "expected true, false or auto")
    try:
        limit = float(max_memory_gb)
    except (TypeError, ValueError):
        raise ConfigError("dataset.max_memory_gb", max_memory_gb,
                          "expected a number of GiB > 0") from None
    if not limit > 0:
        raise ConfigError("dataset.max_memory_gb", max_memory_gb, "expected a number of GiB > 0")
    if size > limit * 2 ** 30:
        return False, (f"decoded size {_size_text(size)} > dataset.max_memory_gb={limit:g}: "
                       "streamed from disk")
    return True, f"decoded size {_size_text(size)} <= dataset.max_memory_gb={limit:g}: in memory"


# --------------------------------------------------------------------------------------------
# The loader


class _PassBatches:
    """The batch_sampler of the loader's one DataLoader: the current pass's batches (lists of
    dataset keys), set before each pass, so the worker pool is started once and kept."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class StreamingLoader(BatchLoader):
    """:class:`~octconv_exp.data.datasets.BatchLoader`'s interface and semantics over a
    :class:`FileSet`: each pass's seeded order is cut into global batches and this rank's
    shard exactly as ``BatchLoader`` cuts it; the batches are decoded by ``workers``
    DataLoader worker processes (0: in this process) and normalised on ``device``.

    Without ``augment`` every batch equals ``BatchLoader``'s over the decoded images, byte
    for byte. With ``augment``, each image is randomly resized-cropped and flipped in the
    worker (see the module's docstring) instead of ``BatchLoader``'s pad-crop-flip.

    One DataLoader, with persistent workers, serves every pass: a pool of processes is
    started once, on the first pass. :meth:`close` stops it (so does garbage collection)."""

    def __init__(self, files: FileSet, batch_size, mean, std, shuffle=False, drop_last=False,
                 device="cpu", seed=0, memory_format=torch.contiguous_format, augment=False,
                 augment_seed=0, rank=0, world_size=1, workers=2):
        # BatchLoader's state, without its tensor of images.
        self.device = torch.device(device)
        self.files = files
        self.labels = files.labels
        self.image_size = int(files.image_size)
        self._set_up_passes(batch_size, mean, std, shuffle, drop_last, seed, memory_format,
                            augment, augment_seed, rank, world_size)
        self.workers = int(workers)
        self.seed = int(seed)
        self.pools_started = 0  # DataLoader iterators (worker pools) created: one per loader
        self._batches = _PassBatches()
        self._dataloader = None

    # num_samples, __len__, state_dict and resume_pass: BatchLoader's.

    def _make_dataloader(self):
        pin = self.device.type == "cuda"
        return torch.utils.data.DataLoader(
            self.files.dataset(augment=self.augment, augment_seed=self.augment_seed),
            batch_sampler=self._batches,
            collate_fn=functools.partial(collate_images, image_size=self.image_size),
            pin_memory=pin, persistent_workers=self.workers > 0,
            **_loader_kwargs(self.workers, self.seed))

    def _pass_keys(self, order, skip, epoch):
        """This rank's batches of the pass, as dataset keys: positions in the FileSet or,
        with augmentation, (position, epoch, position in the pass's order)."""
        g = self.batch_size * self.world_size
        batches = []
        for i in range(skip, len(self)):  # len(): every batch of the pass (skip is cleared)
            whole = global_batch(order, i, self.batch_size, self.world_size)
            idx = shard_of(whole, self.rank, self.world_size).tolist()
            if self.augment:
                where = shard_of(torch.arange(i * g, i * g + len(whole)), self.rank,
                                 self.world_size).tolist()
                batches.append([(k, epoch, p) for k, p in zip(idx, where)])
            else:
                batches.append(idx)
        return batches

    def __iter__(self):
        skip, epoch, order = self._start_pass("cpu")
        self._batches.batches = self._pass_keys(order, skip, epoch)
        if self._dataloader is None:
            self._dataloader = self._make_dataloader()
        before = getattr(self._dataloader, "_iterator", None)
        it = iter(self._dataloader)
        if self.workers > 0 and it is not before:
            self.pools_started += 1
        pin = self.device.type == "cuda"
        for batch in it:
            _raise_failure(batch)
            x, y = batch
            x = self.normalise(x.to(self.device, non_blocking=pin))
            yield x.contiguous(memory_format=self.memory_format), y.to(self.device, non_blocking=pin)

    def close(self):
        """Stop the worker processes (a later pass starts new ones)."""
        dl, self._dataloader = self._dataloader, None
        it = getattr(dl, "_iterator", None) if dl is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


__all__ = ["FileSet", "scan_image_folder", "decode_files", "split_files", "file_stats", "decoded_bytes",
           "choose_in_memory", "stats_sample", "StreamingLoader", "crop_params",
           "decode_image", "DecodeFailure"]
