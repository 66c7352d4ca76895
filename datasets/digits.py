"""The demo source: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes).

No download. The 17 grey levels 0..16 are scaled to 0..255 (rounded), and each image is resized
to `image_size` with PIL bicubic (the ADM crop of a square image is exactly this resize) and kept
as one channel. Items follow scikit-learn's order; class names are "0".."9"; paths "digits/<index>".
"""
from __future__ import annotations

import time

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


def fit_classifier(net: torch.nn.Module, logits_of, steps: int, batch_size: int, seed: int, lr: float,
                   weight_decay: float, log_every: int) -> tuple[float, int]:
    """Train a demo classifier on the first four fifths of the digits (random shifts, AdamW with a one-cycle LR),
    leave it in eval mode; (its accuracy on the held-out fifth, that fifth's size). `logits_of(net, uint8 [B, 1,
    16, 16]) -> [B, 10]` puts the images into the network's input form."""
    images, labels = digits_images(16)
    images, labels = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
    split = held_out_start(len(images))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, steps + 1):
        rows = torch.randint(0, split, (batch_size,), generator=generator)
        loss = torch.nn.functional.cross_entropy(logits_of(net, shifted(images[rows], generator)), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.time() - start:.1f} s", flush=True)
    net.eval()
    with torch.no_grad():
        guesses = logits_of(net, images[split:]).argmax(dim=1)
    return (guesses == labels[split:]).float().mean().item(), len(labels) - split


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
