"""The data set a ``dataset`` config node names, loaded in memory or (an image folder too large
for it) streamed from disk: the one entry point the runner, the backends' tests and
``load_model``'s users call. The data sets themselves: :mod:`.datasets`; streaming:
:mod:`.streaming`."""
import logging
import os
from typing import List, Optional

from .datasets import (IMAGE_SIZE, DataBundle, check_classes, load_cifar10, load_custom, make_synthetic,
                       split_validation)
from .streaming import choose_in_memory, decode_files, file_stats, scan_image_folder, split_files

log = logging.getLogger("octconv_exp")


def load_data(ds_cfg, stats=None, classes=None) -> DataBundle:
    """Load the data set a ``dataset`` config node names.

    ``stats`` (mean, std) and ``classes``: what a saved model was trained with (evaluation
    and resume). The stats are used as they are, never recomputed from today's training
    images (nor taken from dataset.mean/std); a data set whose classes differ from
    ``classes`` is a UserError naming the difference."""
    if "_target_" in list(ds_cfg.keys()):
        train, test = load_custom(ds_cfg)
    elif ds_cfg.name == "synthetic":
        train = make_synthetic(ds_cfg.train_size, seed=ds_cfg.seed, split="train")
        test = make_synthetic(ds_cfg.test_size, seed=ds_cfg.seed, split="test")
    elif ds_cfg.name == "cifar10":
        kwargs = dict(download=ds_cfg.download, verify_checksums=ds_cfg.verify_checksums)
        train = load_cifar10(ds_cfg.root, train=True, **kwargs)
        test = load_cifar10(ds_cfg.root, train=False, **kwargs)
    elif ds_cfg.name == "image_folder":
        size = int(ds_cfg.get("image_size", IMAGE_SIZE))
        train = scan_image_folder(os.path.join(ds_cfg.root, "train"), image_size=size)
        check_classes(train.classes, classes, os.path.join(ds_cfg.root, "train"))
        test = scan_image_folder(os.path.join(ds_cfg.root, "test"), classes=train.classes,
                                 image_size=size)
        in_memory, reason = choose_in_memory(ds_cfg.get("in_memory", "true"),
                                             len(train) + len(test), size,
                                             ds_cfg.get("max_memory_gb", 4))
        log.info("Image folder %s: %d + %d images, %s", ds_cfg.root, len(train), len(test),
                 reason)
        if not in_memory:
            return load_streamed(ds_cfg, train, test, stats=stats)
        train, test = decode_files(train), decode_files(test)
    else:  # the config validation rejects this first
        raise ValueError(f"unknown dataset {ds_cfg.name}")
    check_classes(train.classes, classes, f"dataset={ds_cfg.get('name')}")
    # Held out before the statistics: they describe the images the model trains on.
    train, val = split_validation(train, ds_cfg.get("val_size", 0) or 0, ds_cfg.get("seed", 0))
    mean, std = stats if stats is not None else (ds_cfg.get("mean"), ds_cfg.get("std"))
    if mean is None or std is None:
        stats = train.channel_stats()
        mean = stats[0] if mean is None else mean
        std = stats[1] if std is None else std
    return DataBundle(train=train, test=test, mean=tuple(float(m) for m in mean),
                      std=tuple(float(s) for s in std), val=val)


def load_streamed(ds_cfg, train, test, stats=None) -> DataBundle:
    """An image folder read from disk batch by batch (:mod:`.streaming`): the file lists, the
    validation split held out of them as :func:`split_validation` holds images out, and the
    statistics from ``dataset.stats_images`` training images (all of them when fewer), or
    ``stats`` as :func:`load_data` takes them."""
    train, val = split_files(train, ds_cfg.get("val_size", 0) or 0, ds_cfg.get("seed", 0))
    mean, std = stats if stats is not None else (ds_cfg.get("mean"), ds_cfg.get("std"))
    if mean is None or std is None:
        sample = int(ds_cfg.get("stats_images", 10000))
        stats = file_stats(train, sample=sample, seed=ds_cfg.get("seed", 0),
                           workers=int(ds_cfg.get("workers", 2)))
        log.info("Image folder statistics from %s training images",
                 "all" if len(train) <= sample else f"{sample} of the {len(train)}")
        mean = stats[0] if mean is None else mean
        std = stats[1] if std is None else std
    return DataBundle(train=train, test=test, mean=tuple(float(m) for m in mean),
                      std=tuple(float(s) for s in std), val=val)


def load_image_folder(folder, classes: Optional[List[str]] = None, image_size=IMAGE_SIZE):
    """Every image under folder/<class>/ (nested folders included), converted to RGB and
    resized to image_size x image_size, as one tensor.

    A class folder without images is an error for the training set (a class the model could
    never learn, usually a copy that went wrong); in a test set it is allowed, since a test
    split may lack a class, and said in a warning. The listing is
    :func:`~octconv_exp.data.streaming.scan_image_folder`'s, which a streamed folder reads too."""
    return decode_files(scan_image_folder(folder, classes=classes, image_size=image_size))
