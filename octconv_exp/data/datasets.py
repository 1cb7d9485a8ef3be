"""Data sets held in memory as one uint8 tensor, and loaders that batch the per-image work.

Every data set becomes an :class:`ImageSet`: ``images`` (N, 3, 32, 32) uint8 and ``labels`` (N,)
int64. Nothing happens per sample in Python at training time: :class:`BatchLoader` indexes a
shuffled batch out of the tensor and normalises the whole batch at once, on the training
device (the airbench approach). The seed's ``ToTensor() + Normalize(mean, std)`` is exactly
``(uint8 / 255 - mean) / std``, which is what the loader computes. ``dataset.augment`` pads,
crops and flips whole batches there too (:func:`augment_batch`); ``dataset.val_size`` holds
training images out for validation (:func:`split_validation`) before the statistics.
"""
import hashlib
import importlib
import logging
import os
import pickle
import stat
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

log = logging.getLogger("octconv_exp")

IMAGE_SIZE = 32
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: List[str]

    def __len__(self):
        return self.labels.shape[0]

    def part(self, rank, world_size):
        """This rank's contiguous part of the set (data-parallel evaluation: each image is
        evaluated by exactly one rank; the parts differ by one image at most)."""
        if world_size == 1:
            return self
        index = shard_of(torch.arange(len(self)), rank, world_size)
        return ImageSet(images=self.images[index], labels=self.labels[index],
                        classes=list(self.classes))

    def channel_stats(self):
        """Per-channel mean and std of the images scaled to [0, 1]."""
        x = self.images.to(torch.float64) / 255.0
        return (tuple(x.mean(dim=(0, 2, 3)).tolist()),
                tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()))


@dataclass
class DataBundle:
    train: ImageSet  # what the model trains on: without the validation images, if any
    test: ImageSet
    mean: Sequence[float]
    std: Sequence[float]
    val: Optional[ImageSet] = None  # dataset.val_size images held out of the training set

    @property
    def num_classes(self):
        return len(self.train.classes)

    @property
    def streamed(self):
        """Are the images read from disk batch by batch (an image folder too large to hold,
        see :mod:`.streaming`), rather than held in memory as one tensor?"""
        return not isinstance(self.train, ImageSet)

    @property
    def image_shape(self):
        """(channels, height, width) of every image."""
        if self.streamed:
            return (3, int(self.train.image_size), int(self.train.image_size))
        return tuple(self.train.images.shape[1:])


def check_classes(found, recorded, where):
    """A saved model's classes (``recorded``; None: nothing recorded) against the data set's:
    another list would map labels to the wrong outputs."""
    if recorded is None or list(found) == list(recorded):
        return
    added = [c for c in found if c not in recorded]
    missing = [c for c in recorded if c not in found]
    what = "; ".join(part for part in (
        "new: " + ", ".join(added) if added else "",
        "missing: " + ", ".join(missing) if missing else "",
        "same classes in another order" if not added and not missing else "") if part)
    raise UserError(f"{where} holds the classes {', '.join(found)} and the saved model was "
                    f"trained on {', '.join(recorded)} ({what}); evaluate or resume it on data "
                    "with the classes it was trained on, or train a new model")


def derived_seed(*parts):
    """A 63-bit seed for a torch.Generator from integers (a seed, an epoch, a batch, ...):
    distinct tuples give unrelated streams, and no arithmetic on large seeds can overflow."""
    text = ":".join(str(int(p)) if not isinstance(p, str) else p for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def validation_count(val_size, n):
    """How many of ``n`` training images ``dataset.val_size`` holds out: a count (>= 1), or a
    fraction of ``n`` in (0, 1) rounded to the nearest image (at least one); 0: none."""
    if not val_size:
        return 0
    if val_size >= 1:
        return int(val_size)
    return max(1, int(round(float(val_size) * n)))


def split_validation(train: ImageSet, val_size, seed):
    """``(rest, val)``: ``dataset.val_size`` images of ``train`` held out for validation
    (``val`` is None for 0), chosen by a generator of their own seeded from ``seed``
    (dataset.seed) alone, so the same seed holds out the same images whatever the run's seed.
    Not stratified. Both parts keep the images in their original order."""
    n = len(train)
    k = validation_count(val_size, n)
    if k == 0:
        return train, None
    if k >= n:
        shown = int(val_size) if float(val_size).is_integer() else val_size
        raise UserError(f"dataset.val_size={shown} holds out {k} of the {n} training images "
                        "and leaves none to train on; lower dataset.val_size")
    gen = torch.Generator().manual_seed(derived_seed("validation", seed))
    order = torch.randperm(n, generator=gen)
    held, rest = order[:k].sort().values, order[k:].sort().values

    def part(index):
        return ImageSet(images=train.images[index], labels=train.labels[index],
                        classes=list(train.classes))

    return part(rest), part(held)


# --------------------------------------------------------------------------------------------
# CIFAR-10


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as a protocol-2 pickle written by Python 3 uses it for bytes (and
    numpy's array data): latin-1 only, the one encoding such a pickle names."""
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") not in ("latin1",):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is "
                                     "not how a CIFAR-10 batch stores bytes")
    return text.encode("latin1")


def _pickle_allowed_globals():
    """``(module, name) -> object`` of everything a CIFAR-10 batch may name: what a numpy
    array pickles through (numpy 1 writes numpy.core, numpy 2 numpy._core; protocol 5
    _frombuffer), whichever numpy wrote it, resolved in the installed numpy."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(package + ".multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(package + ".numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class CifarCodeRefused(pickle.UnpicklingError):
    """A CIFAR-10 file names a Python object a batch never holds (code it would run)."""


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's python batches (dicts of numpy arrays, lists, str, bytes
    and ints) that refuses every other global, so a crafted file never runs code: plain
    ``pickle.load`` calls whatever callable a file names (``os.system`` included)."""

    def find_class(self, module, name):
        allowed = _pickle_allowed_globals()
        if (module, name) not in allowed:
            raise CifarCodeRefused(f"{module}.{name}")
        return allowed[(module, name)]


def read_cifar_pickle(path):
    """The object in one CIFAR-10 python file, read by :class:`CifarUnpickler`; a file that
    names anything else is a one-line :class:`UserError` naming it, nothing of it run."""
    with open(path, "rb") as f:
        try:
            return CifarUnpickler(f, encoding="latin1").load()
        except CifarCodeRefused as exc:
            raise UserError(f"CIFAR-10 file {path} names {exc}, which a CIFAR-10 batch never "
                            "holds (only numpy arrays, lists, str, bytes and ints): refused "
                            "without running it; delete it and download CIFAR-10 again") from None


def _cifar10_class():
    # Deferred: importing torchvision imports torch._dynamo on torch 2.1+ (seconds in every
    # fresh process: a torchrun rank, a joblib worker); only CIFAR-10 needs it here.
    import torchvision

    class CIFAR10(torchvision.datasets.CIFAR10):
        """torchvision's CIFAR10 (its download and integrity check), with the MD5
        verification of the files optional, and the batches read by
        :func:`read_cifar_pickle` instead of ``pickle.load`` into exactly what torchvision
        makes of them (``data`` N x 32 x 32 x 3 uint8, ``targets``, ``classes``)."""

        def __init__(self, root, train, download, verify_checksums=True):
            if not verify_checksums:  # presence only (check_integrity with md5=None)
                self.train_list = [(name, None) for name, _ in self.train_list]
                self.test_list = [(name, None) for name, _ in self.test_list]
                self.meta = dict(self.meta, md5=None)
            torchvision.datasets.VisionDataset.__init__(self, root)
            self.train = train
            if download:
                self.download()
            if not self._check_integrity():
                raise RuntimeError("Dataset not found or corrupted. You can use download=True "
                                   "to download it")
            data, self.targets = [], []
            for name, _ in (self.train_list if train else self.test_list):
                entry = read_cifar_pickle(os.path.join(self.root, self.base_folder, name))
                data.append(entry["data"])
                self.targets.extend(entry["labels"] if "labels" in entry
                                    else entry["fine_labels"])
            self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            self._load_meta()

        def _load_meta(self):
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not torchvision.datasets.utils.check_integrity(path, self.meta["md5"]):
                raise RuntimeError("Dataset metadata file not found or corrupted. You can use "
                                   "download=True to download it")
            self.classes = read_cifar_pickle(path)[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return CIFAR10


def load_cifar10(root, train, download, verify_checksums=True):
    """CIFAR-10 through torchvision (downloaded into ``root`` when allowed and absent)."""
    cls = _cifar10_class()
    split = "training" if train else "test"
    folder = os.path.abspath(os.path.join(root, cls.base_folder))
    if download:
        try:
            cls(root, train=train, download=True, verify_checksums=verify_checksums)
        except (OSError, RuntimeError) as exc:  # no network, or a broken archive
            raise UserError(
                f"CIFAR-10 is not in {folder} and could not be downloaded "
                f"({exception_line(exc)}); put cifar-10-batches-py/ there by hand, or run offline "
                "with dataset=synthetic") from None
        except (ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError,
                pickle.UnpicklingError):
            pass  # downloaded, but unreadable: reported just below
    try:
        ds = cls(root, train=train, download=False, verify_checksums=verify_checksums)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted."
        missing = [name for name, _ in cls.train_list + cls.test_list
                   if not os.path.isfile(os.path.join(folder, name))]
        what = ("missing " + ", ".join(missing)) if missing else "checksum mismatch"
        raise UserError(
            f"CIFAR-10 {split} files not usable in {folder} ({what}); set dataset.root to the "
            "folder holding cifar-10-batches-py/, allow dataset.download=true on a machine "
            "with internet, or run offline with dataset=synthetic") from None
    except (ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError,
            pickle.UnpicklingError) as exc:
        # TypeError, AttributeError: a file that unpickles to something else than a batch
        # (a list, arguments numpy refuses).
        raise UserError(f"CIFAR-10 {split} files in {folder} are corrupt "
                        f"({type(exc).__name__}: {exception_line(exc)}); delete them and download "
                        "again") from None
    data = np.asarray(ds.data)
    if (data.ndim != 4 or data.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)
            or data.dtype != np.uint8 or len(ds.targets) != len(data)):
        raise UserError(f"CIFAR-10 {split} files in {folder} are corrupt "
                        f"(images of shape {data.shape} and type {data.dtype}, "
                        f"{len(ds.targets)} labels)")
    try:
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise UserError(f"CIFAR-10 {split} files in {folder} are corrupt (labels that are not "
                        "integers)") from None
    if len(labels) and (labels.min() < 0 or labels.max() >= len(ds.classes)):
        raise UserError(f"CIFAR-10 {split} files in {folder} are corrupt (labels outside "
                        f"0..{len(ds.classes) - 1})")
    images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    return ImageSet(images=images, labels=labels, classes=list(ds.classes))


def exception_line(exc):
    """An exception's message with its whitespace collapsed, to quote inside one error line."""
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------------------------
# Image folder


def _image_files(class_dir, other_classes=()):
    """The image files under ``class_dir``, nested folders included (as torchvision's
    ``ImageFolder`` reads them), in a stable order; hidden files and folders are skipped.

    Symbolic links to folders are followed, but no folder is read twice: a link to a folder
    above (``loop -> ..``, which os.walk follows round and round, reading other classes'
    images under this class), to a folder already read, or to one of ``other_classes`` is
    skipped with a warning. Only regular files are read: anything else named like an image (a
    FIFO, whose open waits forever for a writer; a socket; a device) is skipped with a
    warning."""
    top = os.path.realpath(class_dir)
    seen = {top}
    barred = {os.path.realpath(d) for d in other_classes}
    found, loops, irregular = [], [], []
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, name))
            if real in seen or real in barred or os.path.commonpath([top, real]) == real:
                loops.append(os.path.join(root, name))
                continue
            seen.add(real)
            kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(root, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = True  # a broken link: _read_image names it in its error
            (found if regular else irregular).append(path)
    if loops:
        log.warning("%s: not following %d link(s) to a folder already read or above it: %s",
                    class_dir, len(loops), _some(loops))
    if irregular:
        log.warning("%s: skipping %d file(s) named like an image that are not regular files "
                    "(a FIFO, socket or device): %s", class_dir, len(irregular), _some(irregular))
    return found


def _some(paths, shown=3):
    return ", ".join(paths[:shown]) + (", ..." if len(paths) > shown else "")


def _read_image(path, image_size=IMAGE_SIZE):
    """One image as an image_size x image_size RGB uint8 array; a file Pillow cannot read, or one over its
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``), is a :class:`UserError` naming it."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above: treat
            # both as what they are, an image far too large to be a training sample.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"image {path} is over Pillow's decompression-bomb limit of "
                        f"{Image.MAX_IMAGE_PIXELS} pixels ({' '.join(str(exc).split())}); "
                        "remove it or shrink it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Your own data set (dataset._target_)

#: Keys of every dataset node that octconv-exp reads itself; the rest are the class's arguments.
COMMON_DATASET_KEYS = ("_target_", "name", "seed", "val_size", "augment", "mean", "std")


def load_custom(ds_cfg):
    """``dataset._target_``: a class called as torchvision's data sets are,
    ``Class(**arguments, train=True|False)``, returning a map-style data set of (image, label)
    pairs, loaded into memory as one uint8 tensor per split."""
    node = OmegaConf.to_container(ds_cfg, resolve=True)
    target = str(node["_target_"])
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"dataset._target_={target} cannot be imported ({exc})") from None
    kwargs = {k: v for k, v in node.items() if k not in COMMON_DATASET_KEYS}
    splits = []
    for train in (True, False):
        try:
            ds = cls(**kwargs, train=train)
        except TypeError as exc:
            raise UserError(f"dataset._target_={target}: {exc}; it is called as "
                            f"{name}(**arguments, train=True|False)") from None
        splits.append(as_image_set(ds, f"{target}(train={train})"))
    train, test = splits
    if test.classes != train.classes:
        test.classes = train.classes
    return train, test


def _as_uint8_chw(image):
    """A PIL image, an HxWx3 uint8 array or a 3xHxW tensor (uint8, or float in [0, 1]) as a
    3xHxW uint8 tensor; None for anything else."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3:
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        else:
            image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        return None
    if image.dtype == torch.uint8:
        return image.contiguous()
    if image.is_floating_point():
        return (image.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return None


def as_image_set(ds, what):
    """A map-style data set of (image, label) pairs as an :class:`ImageSet`."""
    try:
        n = len(ds)
    except TypeError:
        raise UserError(f"{what} has no len(): a map-style data set is needed") from None
    if n == 0:
        raise UserError(f"{what} is empty")
    images, labels, shape = [], [], None
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{what}[{i}] is not an (image, label) pair")
        image, label = _as_uint8_chw(item[0]), item[1]
        if image is None:
            raise UserError(f"{what}[{i}]: the image is a {type(item[0]).__name__}; expected a "
                            "PIL image, an HxWx3 uint8 array or a 3xHxW tensor")
        if shape is None:
            shape = tuple(image.shape)
        elif tuple(image.shape) != shape:
            raise UserError(f"{what}[{i}] is {tuple(image.shape)} and [0] is {shape}: every "
                            "image must have the same size")
        try:
            labels.append(int(label))
        except (TypeError, ValueError):
            raise UserError(f"{what}[{i}]: the label {label!r} is not an integer") from None
        images.append(image)
    labels = torch.tensor(labels, dtype=torch.int64)
    if labels.min() < 0:
        raise UserError(f"{what}: labels must be >= 0, found {int(labels.min())}")
    classes = getattr(ds, "classes", None)
    if not classes:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    if int(labels.max()) >= len(classes):
        raise UserError(f"{what}: label {int(labels.max())} and only {len(classes)} classes")
    return ImageSet(images=torch.stack(images), labels=labels, classes=[str(c) for c in classes])


# --------------------------------------------------------------------------------------------
# Synthetic

# Five coarse classes (shape: low frequency) x two textures (high frequency); colours are
# drawn from the palette independently of the class.
_PALETTE = torch.tensor([[0.85, 0.25, 0.20], [0.20, 0.70, 0.25], [0.25, 0.35, 0.90],
                         [0.90, 0.80, 0.20], [0.75, 0.30, 0.80]])
SYNTHETIC_CLASSES = [f"{shape}-{texture}" for shape in ("disk", "square", "hbar", "vbar", "ring")
                     for texture in ("checker", "stripes")]


def make_synthetic(n, seed=0, split="train"):
    """A deterministic, learnable CIFAR-shaped data set, generated in one vectorised pass.

    Label k = 2 * shape + texture. The shape (disk, square, horizontal bar, vertical bar, ring)
    survives 2x2 average pooling, so the low-frequency octave sees it. The texture (a 1-pixel
    checkerboard or 1-pixel stripes, random phase, low contrast under pixel noise) averages to
    the same value under 2x2 pooling, so only the high-frequency path can tell the two apart.
    Position, size, colour (independent of the class), contrast and noise vary per image.
    """
    g = torch.Generator().manual_seed(int(seed) * 2 + (0 if split == "train" else 1) + 7919)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    shape, texture = labels // 2, labels % 2

    def u(lo, hi, *dims):
        return lo + (hi - lo) * torch.rand(*dims, generator=g)

    coords = (torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5) / IMAGE_SIZE * 2 - 1
    cx, cy = u(-0.3, 0.3, n, 1, 1), u(-0.3, 0.3, n, 1, 1)
    size = u(0.45, 0.7, n, 1, 1)
    mask = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE)
    # Each image computes only its own shape's mask (one pass over the pixels per image).
    for k in range(5):
        idx = (shape == k).nonzero().squeeze(1)
        dx = coords.view(1, 1, -1) - cx[idx]
        dy = coords.view(1, -1, 1) - cy[idx]
        sz = size[idx]
        if k == 0:  # disk
            m = dx * dx + dy * dy < sz * sz
        elif k == 1:  # square
            m = torch.maximum(dx.abs(), dy.abs()) < sz * 0.85
        elif k == 2:  # horizontal bar
            m = (dy.abs() < sz * 0.35) & (dx.abs() < sz * 1.2)
        elif k == 3:  # vertical bar
            m = (dx.abs() < sz * 0.35) & (dy.abs() < sz * 1.2)
        else:  # ring
            r2 = dx * dx + dy * dy
            m = (r2 < sz * sz) & (r2 > (sz * 0.55) ** 2)
        mask[idx] = m.float()

    ii = torch.arange(IMAGE_SIZE).view(1, -1, 1)
    jj = torch.arange(IMAGE_SIZE).view(1, 1, -1)
    phase = torch.randint(0, 2, (n, 1, 1), generator=g)
    # +-1 per pixel: a 1-pixel checkerboard (texture 0) or 1-pixel horizontal stripes (1).
    pattern = ((ii + jj * (1 - texture.view(n, 1, 1)) + phase) % 2).float().mul_(2).sub_(1)
    contrast = u(0.03, 0.10, n, 1, 1)

    # The colour is drawn independently of the class: a distractor the model must learn to ignore.
    colour = (_PALETTE[torch.randint(0, 5, (n,), generator=g)] + u(-0.15, 0.15, n, 3)).clamp(0, 1)
    background = u(0.05, 0.35, n, 1) + u(-0.05, 0.05, n, 3)  # (n, 3)
    # Texture and (grey) noise are shared by the three channels: one (n, 32, 32) plane.
    # Everything is scaled to 0..255 up front; +0.5 in the background makes the final
    # truncation to uint8 a rounding.
    shared = pattern.mul_(mask).mul_(contrast * 255)
    shared.add_(torch.randn(n, IMAGE_SIZE, IMAGE_SIZE, generator=g), alpha=0.10 * 255)
    img = torch.addcmul((background * 255 + 0.5).view(n, 3, 1, 1),
                        ((colour - background) * 255).view(n, 3, 1, 1), mask.unsqueeze(1))
    img.add_(shared.unsqueeze(1))
    images = img.clamp_(0, 255).to(torch.uint8)
    return ImageSet(images=images, labels=labels.to(torch.int64), classes=list(SYNTHETIC_CLASSES))


# --------------------------------------------------------------------------------------------
# Loading


class Normalise:
    """uint8 images -> (x / 255 - mean) / std, computed as one fused x * scale + shift."""

    def __init__(self, mean, std, device="cpu"):
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)

    def __call__(self, images_uint8):
        return torch.addcmul(self.shift, images_uint8.to(torch.float32), self.scale)


#: The CIFAR augmentation's padding (pixels on each side before the random crop).
AUGMENT_PADDING = 4


def augment_batch(images, generator, padding=AUGMENT_PADDING, whole=None, rank=0, world_size=1):
    """The standard CIFAR augmentation of a whole batch of normalised images, with tensor ops
    only: each image padded by ``padding`` pixels of 0 on every side, cropped back to its
    H x W at a random offset, and flipped left-right with probability 1/2.

    The padding is 0 *after* normalisation, i.e. the data set's mean colour, where
    torchvision's ``RandomCrop(padding=4)`` on unnormalised images pads black: a detail of
    the border, the same on every backend. The offsets and flips are drawn from
    ``generator`` (a CPU generator), so a batch's augmentation depends on the generator's
    seed alone, not on the device or on anything drawn before it.

    ``images`` may be one rank's :func:`shard_of` a global batch of ``whole`` images: the
    offsets and flips are drawn for all ``whole`` and this rank's part is used, so the
    ranks together augment the global batch as one process would."""
    b, _, h, w = images.shape
    whole = b if whole is None else int(whole)
    offsets = torch.randint(0, 2 * padding + 1, (2, whole), generator=generator)
    flips = torch.rand(whole, generator=generator) < 0.5
    if whole != b:
        part = shard_of(torch.arange(whole), rank, world_size)
        offsets, flips = offsets[:, part], flips[part]
    rows = offsets[0].view(b, 1) + torch.arange(h)  # rows of the padded image, per image
    cols = offsets[1].view(b, 1) + torch.arange(w)
    cols = torch.where(flips.view(b, 1), cols.flip(1), cols)  # a flip reads the crop backwards
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    # One gather: (b, 1, 1), (b, h, 1), (b, 1, w) around the channel slice -> (b, h, w, c).
    out = padded[torch.arange(b, device=device).view(b, 1, 1), :,
                 rows.to(device).view(b, h, 1), cols.to(device).view(b, 1, w)]
    return out.permute(0, 3, 1, 2)


def augmentation_generator(seed, epoch, batch):
    """The generator of one training batch's augmentation: from (seed, epoch, batch index)
    alone, so a resumed run that skips the batches already done augments the rest exactly
    as an uninterrupted run did."""
    return torch.Generator().manual_seed(derived_seed("augment", seed, epoch, batch))


def batch_count(n, batch_size, drop_last, world_size=1):
    """Steps in one pass over ``n`` samples, ``batch_size`` per rank over ``world_size`` ranks:
    a global batch is ``batch_size * world_size`` samples."""
    g = int(batch_size) * int(world_size)
    return n // g if drop_last else -(-n // g)


def global_batch(index, step, batch_size, world_size=1):
    """The samples (positions in the pass's order) of global batch ``step``."""
    g = int(batch_size) * int(world_size)
    return index[step * g:(step + 1) * g]


def shard_of(batch, rank, world_size):
    """This rank's part of a global batch: contiguous, as equal as can be (the ranks' parts
    differ by one sample at most, only in a last, smaller batch). With ``batch_size`` per rank
    the union over ranks is the global batch, so N ranks step on exactly the samples one
    process at ``N * batch_size`` would."""
    if world_size == 1:
        return batch
    return torch.tensor_split(batch, int(world_size))[int(rank)]


class BatchLoader:
    """Shuffled batches of an :class:`ImageSet`, normalised as whole batches on ``device``.

    The uint8 images are moved to the device once; each batch is one index operation and one
    fused normalisation, so the loader costs a small fraction of a training step. With
    ``augment``, each batch is then augmented on the device (:func:`augment_batch`) with
    the randomness of :func:`augmentation_generator` (``augment_seed``, the pass number,
    the batch index).

    Data-parallel (``world_size`` > 1): every rank draws the same seeded order and takes its
    :func:`shard_of` each global batch of ``batch_size * world_size`` samples; augmentation is
    drawn for the global batch and sliced, so the ranks together see what one process would.
    """

    def __init__(self, data: ImageSet, batch_size, mean, std, shuffle=False, drop_last=False,
                 device="cpu", seed=0, memory_format=torch.contiguous_format, augment=False,
                 augment_seed=0, rank=0, world_size=1):
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self._set_up_passes(batch_size, mean, std, shuffle, drop_last, seed, memory_format,
                            augment, augment_seed, rank, world_size)

    def _set_up_passes(self, batch_size, mean, std, shuffle, drop_last, seed, memory_format,
                       augment, augment_seed, rank, world_size):
        """What decides the passes (order, shards, augmentation, resumption): the state a
        loader over files (streaming.StreamingLoader) shares with this one."""
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(int(seed))
        self.normalise = Normalise(mean, std, device=self.device)
        self.memory_format = memory_format
        self.augment = bool(augment)
        self.augment_seed = int(augment_seed)
        self.epoch = 1  # the number of the next pass (the training loader: the epoch)
        self.epoch_start_state = self.generator.get_state()
        self.skip = 0  # batches the next pass leaves out (resuming inside an epoch)
        self.rank, self.world_size = int(rank), int(world_size)

    @property
    def num_samples(self):
        return self.labels.shape[0]

    def __len__(self):
        return batch_count(self.num_samples, self.batch_size, self.drop_last,
                           self.world_size) - self.skip

    def state_dict(self, inside_pass=False):
        """Where the shuffling stands: the generator state the next pass starts from (or, with
        ``inside_pass``, the one the current pass started from), and that pass's number."""
        state = self.epoch_start_state if inside_pass else self.generator.get_state()
        return {"generator": state.clone(), "epoch": self.epoch - 1 if inside_pass else self.epoch}

    def resume_pass(self, generator_state, skip, epoch=None):
        """Make the next pass the one that started from ``generator_state``, minus its first
        ``skip`` batches (and, given ``epoch``, number it so: its augmentation follows)."""
        self.generator.set_state(generator_state)
        self.epoch_start_state = generator_state.clone()
        self.skip = int(skip)
        if epoch is not None:
            self.epoch = int(epoch)

    def _start_pass(self, device):
        """``(skip, epoch, order)`` of the pass about to run: the batches it leaves out, its
        number, and its order of the samples (on ``device``); moves the loader on a pass."""
        n = self.num_samples
        skip, self.skip = self.skip, 0
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.epoch_start_state = self.generator.get_state()
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(device)
        else:
            order = torch.arange(n, device=device)
        return skip, epoch, order

    def __iter__(self):
        skip, epoch, order = self._start_pass(self.device)
        for i in range(skip, len(self)):  # len(): every batch of the pass (skip is cleared)
            whole = global_batch(order, i, self.batch_size, self.world_size)
            idx = shard_of(whole, self.rank, self.world_size)
            if not self.shuffle and self.world_size == 1:
                x, y = self.images[idx[0]:idx[-1] + 1], self.labels[idx[0]:idx[-1] + 1]
            else:
                x, y = self.images[idx], self.labels[idx]
            x = self.normalise(x)
            if self.augment:
                # Drawn for the global batch, this rank's part kept (world_size 1: all).
                x = augment_batch(x, augmentation_generator(self.augment_seed, epoch, i),
                                  whole=len(whole), rank=self.rank, world_size=self.world_size)
            yield x.contiguous(memory_format=self.memory_format), y
