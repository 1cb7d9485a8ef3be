"""The torchvision ``ImageFolder`` that a streamed folder's DataLoader workers index
(:meth:`~octconv_exp.data.streaming.FileSet.dataset`), and the augmented decoding it does.

A module of its own so that torchvision is imported only where a folder is streamed:
importing torchvision imports ``torch._dynamo`` on torch 2.1 and later, seconds of start-up
that a run on CIFAR-10 arrays or synthetic data never needs.
"""
import functools

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode

from ..errors import UserError
from .decoding import DecodeFailure, _open_rgb, augment_seed_of, crop_params, decode_image


def decode_augmented(path, image_size, seed):
    """One file decoded at its original size, randomly resized-cropped to image_size x
    image_size and flipped left-right with probability 1/2, with a generator seeded by
    ``seed``: a 3 x image_size x image_size uint8 tensor."""
    img = _open_rgb(path, image_size)
    gen = torch.Generator().manual_seed(int(seed))
    top, left, h, w = crop_params(img.height, img.width, gen)
    img = TF.resized_crop(img, top, left, h, w, [image_size, image_size],
                          interpolation=InterpolationMode.BILINEAR, antialias=True)
    if torch.rand(1, generator=gen).item() < 0.5:
        img = TF.hflip(img)
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageFileFolder(ImageFolder):
    """A torchvision ImageFolder over a :class:`FileSet`'s samples (its order, its classes),
    decoding as ``_read_image`` does into 3 x S x S uint8 tensors.

    Indexed by a position, or by ``(position, epoch, position in the pass)`` to decode with
    augmentation. A file that cannot be read gives a :class:`DecodeFailure` carrying
    ``_read_image``'s one-line message instead of an exception, so that the message crosses
    from a worker process intact (a worker's exception would arrive as a traceback)."""

    def __init__(self, files, augment=False, augment_seed=0):
        self._files = files
        self.image_size = int(files.image_size)
        self.augment = bool(augment)
        self.augment_seed = int(augment_seed)
        super().__init__(files.root or ".",
                         loader=functools.partial(decode_image, image_size=self.image_size))

    def find_classes(self, directory):
        classes = list(self._files.classes)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        return list(self._files.samples)

    def __getitem__(self, key):
        try:
            if isinstance(key, tuple):
                index, epoch, position = key
                path, target = self.samples[index]
                seed = augment_seed_of(self.augment_seed, epoch, position)
                return decode_augmented(path, self.image_size, seed), target
            return super().__getitem__(key)
        except UserError as exc:
            return DecodeFailure(str(exc))


__all__ = ["ImageFileFolder", "decode_augmented"]
