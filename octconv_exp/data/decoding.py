"""One image file decoded in a DataLoader worker, for a streamed folder
(:mod:`~octconv_exp.data.streaming`): as ``_read_image`` decodes it, or randomly resized-cropped
and flipped (:mod:`~octconv_exp.data.imagefolder` does that part, with torchvision), and the
failure that crosses back from a worker as one line."""
import math
import warnings

import numpy as np
import torch
from PIL import Image

from .datasets import IMAGE_SIZE, _read_image, derived_seed

#: RandomResizedCrop's defaults (torchvision, and the ImageNet recipe).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decode_image(path, image_size=IMAGE_SIZE):
    """One file as a 3 x image_size x image_size uint8 tensor, decoded by ``_read_image``."""
    return torch.from_numpy(np.ascontiguousarray(_read_image(path, image_size).transpose(2, 0, 1)))


def _open_rgb(path, image_size):
    """The file as an RGB PIL image at its original size; a file ``_read_image`` refuses
    raises the very :class:`UserError` it raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except Exception:  # noqa: BLE001 - re-read by _read_image for its one-line UserError
        _read_image(path, image_size)
        raise


def crop_params(height, width, generator, scale=CROP_SCALE, ratio=CROP_RATIO):
    """``(top, left, h, w)`` of a random resized crop: torchvision's
    ``RandomResizedCrop.get_params`` (10 attempts, then a centre crop), with its random
    numbers drawn from ``generator`` instead of torch's global generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                    generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_seed_of(augment_seed, epoch, position):
    """The seed of one sample's augmentation: the sample's position in the pass's order."""
    return derived_seed("augment", augment_seed, epoch, position)


class DecodeFailure:
    """A file a worker could not decode: ``_read_image``'s one-line message."""

    def __init__(self, message):
        self.message = message


__all__ = ["CROP_SCALE", "CROP_RATIO", "decode_image", "crop_params", "augment_seed_of",
           "DecodeFailure"]
