"""The demo's feature network: a small digit classifier in place of Inception, for FD / precision / recall / IS on
the 16x16 digits.

Inception's features of 16x16 greyscale digits upsampled to 299 say little about digits, and its weights cannot be
downloaded here; a classifier trained on the digits themselves (`scripts/train_digits_classifier.py`, seconds on a
CPU) gives features that separate the classes and react to blur and noise. Its penultimate layer (FEATURES values)
plays Inception's pool_3 (the Frechet distance, precision/recall), its logits Inception's (IS), and because its
classes are the demo's labels it also scores whether a generated digit is the one asked for (`classifies_labels`).

The file is a plain tensor dict (weights_only-loadable): FORMAT, the state dict, the image size it was trained
at, and the held-out accuracy measured by the script. The extractor's id carries the file's hash, so cached
reference statistics are recomputed whenever the network changes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from metrics.features import FeatureExtractor, Features
from runtime.atomic_file import atomic_write

FORMAT = "dit-trainer digits classifier v1"
FEATURES = 64
CLASSES = 10
TRAIN_HELP = "train it with `python scripts/train_digits_classifier.py` (seconds on a CPU)"


class DigitsNet(nn.Module):
    """Two conv stages (16 and 32 channels, each halving the side) and two linear layers: [B, 1, S, S] in
    [-1, 1] -> (features [B, FEATURES], logits [B, CLASSES]). The features are the penultimate layer before its
    ReLU: a ReLU'd unit that never fires on some set of images would make that set's covariance singular."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the digits classifier needs an image size divisible by 4, got {image_size}")
        self.image_size = image_size
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(32 * (image_size // 4) ** 2, FEATURES))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURES, CLASSES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.convs(x))
        return features, self.head(features)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3) -> float [B, 1, H, W] in [-1, 1] (RGB averaged to grey)."""
    grey = images.float().mean(dim=1, keepdim=True) if images.shape[1] != 1 else images.float()
    return grey / 127.5 - 1.0


def save_classifier(net: DigitsNet, held_out_accuracy: float, path: str | Path) -> None:
    """Write the file atomically (a half-written network would score every later evaluation wrongly)."""
    state = {"format": FORMAT, "image_size": net.image_size, "held_out_accuracy": float(held_out_accuracy),
             "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    with atomic_write(Path(path)) as handle:
        torch.save(state, handle)


def file_hash(path: Path) -> str:
    """The network's identity (its id, FID sweeps' keys): a retrained file never reuses old numbers."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class DigitsFeatures(FeatureExtractor):
    """uint8 images -> the classifier's features and logits; no spatial features (no sFID)."""

    classifies_labels = True

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.digits_classifier={path}: no such file; {TRAIN_HELP}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"evaluate.digits_classifier={path} is not a torch file: {err}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"evaluate.digits_classifier={path} is not a digits classifier file of "
                             f"scripts/train_digits_classifier.py; {TRAIN_HELP}")
        self.device = torch.device(device)
        self.net = DigitsNet(int(state["image_size"]))
        self.net.load_state_dict(state["state_dict"])
        self.net.to(self.device).eval().requires_grad_(False)
        self.held_out_accuracy = float(state["held_out_accuracy"])
        self.id = f"digits-classifier/{file_hash(path)}/features{FEATURES}+logits"

    def __call__(self, images: torch.Tensor) -> Features:
        size = self.net.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"the digits classifier was trained on {size}x{size} images, got "
                             f"{images.shape[-2]}x{images.shape[-1]}: it scores the digits demo only")
        with torch.inference_mode():
            features, logits = self.net(to_input(images).to(self.device))
        return Features(pool=features.float(), logits=logits.float())
