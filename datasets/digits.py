"""The demo source: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes).

No download. The 17 grey levels 0..16 are scaled to 0..255 (rounded), and each image is resized
to `image_size` with PIL bicubic (the ADM crop of a square image is exactly this resize) and kept
as one channel. Items follow scikit-learn's order; class names are "0".."9"; paths "digits/<index>".
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DIGITS_LEVELS = 16  # load_digits pixel values are integers 0..16


def digits_images(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [1797, image_size, image_size], int64 labels [1797])."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"data.image_size={image_size} is too small for the digits demo (at least 8)")
    digits = load_digits()
    grey = np.round(digits.images * (255.0 / DIGITS_LEVELS)).astype(np.uint8)
    resized = np.stack(
        [np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BICUBIC)) for img in grey]
    )
    return resized, digits.target.astype(np.int64)


def held_out_start(num_images: int) -> int:
    """Where the held-out fifth of the digits begins (the demo's classifiers train on the rest)."""
    return num_images * 4 // 5


def shifted(images: torch.Tensor, generator: torch.Generator, most: int = 2) -> torch.Tensor:
    """The batch moved by up to `most` pixels each way (one random shift, zero fill): the demo classifiers'
    augmentation."""
    dy, dx = torch.randint(0, 2 * most + 1, (2,), generator=generator).tolist()
    side = images.shape[-1]
    return torch.nn.functional.pad(images, (most, most, most, most))[..., dy:dy + side, dx:dx + side]


class DigitsSource(Dataset):
    """Item i -> (i, uint8 tensor [1, S, S], ""): the same interface as ImageFolderSource."""

    channels = 1

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self.images, self.labels = digits_images(self.image_size)
        self.paths = [f"digits/{i}" for i in range(len(self.images))]
        self.class_names = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        return index, torch.from_numpy(self.images[index]).unsqueeze(0), ""
