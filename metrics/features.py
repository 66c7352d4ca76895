"""Feature networks for the metrics, and running one over an ADM-format `.npz`.

The metrics only need, per image, pool features (FID, precision/recall), class logits (IS)
and optionally spatial features (sFID); a `FeatureExtractor` returns those three. The real one
is torch-fidelity's "inception-v3-compat", a PyTorch port of the TF Inception graph ADM's
evaluator uses (spec section 5): TF1 bilinear resize to 299, (x - 128) / 128, TF pooling,
2048-d pool_3 features and 1008 logits without the classifier bias.

sFID: ADM taps `mixed_6/conv:0` and keeps its first 7 channels (17 x 17 x 7 = 2023 values).
In that graph `mixed_6` is the 4th 17x17 block (torchvision's Mixed_6d: torch-fidelity's weight
conversion maps `mixed_6/conv/*` to `Mixed_6d.branch1x1`) and the op named `mixed_6/conv` is the
ReLU after its batchnorm, i.e. the output of torch-fidelity's `Mixed_6d.branch1x1`. It is read
with a forward hook and flattened in TF's NHWC order (the order does not change a Frechet
distance). Checked against the graph's op names, not numerically against ADM's TF run.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from metrics.npz import inspect_npz, iter_image_batches
from runtime.console import progress_bar

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7] of mixed_6/conv


@dataclass
class Features:
    """One batch: pool [B, D] (FID, precision/recall), logits [B, K] (IS), spatial [B, S] or None (sFID)."""

    pool: torch.Tensor
    logits: torch.Tensor
    spatial: Optional[torch.Tensor] = None


@dataclass
class FeatureArrays:
    """Features of a whole file, as float32 numpy arrays in file order."""

    pool: np.ndarray
    logits: np.ndarray
    spatial: Optional[np.ndarray]


class FeatureExtractor(ABC):
    """uint8 [B, 3, H, W] images in [0, 255] -> Features.

    `id` names the network and its outputs; cached reference statistics are keyed by it, so
    it must change whenever the features would. `classifies_labels`: the logits' classes are the
    generator's labels (the digits classifier, not Inception's 1008 classes), so the share of
    samples classified as the label they were generated for is a meaningful score.
    """

    id: str = "unnamed"
    device: torch.device = torch.device("cpu")
    classifies_labels: bool = False

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> Features:
        ...


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 convolutions/matmuls on Ampere+ GPUs: TF32 (cuDNN's default) would perturb the features."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class InceptionV3Compat(FeatureExtractor):
    """torch-fidelity's TF-compatible Inception: pool_3 (2048), unbiased logits (1008), mixed_6/conv[:7] (2023)."""

    def __init__(self, weights_path: Optional[str | Path], device: torch.device | str = "cpu"):
        import torch_fidelity
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.device = torch.device(device)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        ).to(self.device)
        outputs = "pool_3+logits_unbiased+mixed_6.conv[:7]"
        self.id = f"inception-v3-compat/torch-fidelity-{torch_fidelity.__version__}/{outputs}"
        self._spatial: Optional[torch.Tensor] = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        nhwc = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = nhwc.reshape(output.shape[0], -1).float()

    def __call__(self, images: torch.Tensor) -> Features:
        with torch.inference_mode(), _no_tf32():
            pool, logits = self.net(images.to(self.device))
        spatial, self._spatial = self._spatial, None
        return Features(pool=pool, logits=logits, spatial=spatial)


def cached_inception_path() -> Path:
    """Where torch.hub (and so torch-fidelity's own download) keeps the weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _offline_help() -> str:
    return (
        f"download {INCEPTION_URL} on a machine with internet access and set "
        f"evaluate.inception_weights=/path/to/{INCEPTION_FILENAME} (or copy it to {cached_inception_path()})"
    )


def _check_plain_state_dict(path: Path) -> None:
    """Refuse anything but a plain tensor dict before torch-fidelity unpickles it with weights_only=False."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"evaluate.inception_weights={path} is not a plain PyTorch state dict: {err}") from None
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(
            f"evaluate.inception_weights={path} is not torch-fidelity's Inception state dict (no fc.weight)"
        )


def build_inception(weights_path: Optional[str | Path], device: torch.device | str = "cpu") -> InceptionV3Compat:
    """The Inception extractor from `weights_path`, else torch.hub's cache, else torch-fidelity's download."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"evaluate.inception_weights={weights_path}: no such file; {_offline_help()}")
    else:
        path = cached_inception_path() if cached_inception_path().is_file() else None
    if path is not None:
        _check_plain_state_dict(path)
        return InceptionV3Compat(path, device)
    try:
        return InceptionV3Compat(None, device)
    except OSError as err:  # URLError, socket and SSL errors are all OSErrors
        message = f"no local Inception weights and the download failed ({err}); {_offline_help()}"
        raise FileNotFoundError(message) from err


def extract_npz_features(
    path: str | Path, extractor: FeatureExtractor, batch_size: int, show_progress: bool = True
) -> FeatureArrays:
    """Run `extractor` over arr_0 of an `.npz`, streaming `batch_size` images at a time."""
    num_images = inspect_npz(path).num_images
    pool = logits = spatial = None
    bar = progress_bar(num_images, 0, f"features {Path(path).name}", show_progress)
    start = 0
    for batch in iter_image_batches(path, batch_size):
        images = torch.from_numpy(batch).permute(0, 3, 1, 2)
        if images.shape[1] == 1:  # grayscale (demo data): replicate to RGB
            images = images.expand(-1, 3, -1, -1)
        out = extractor(images)
        if pool is None:
            pool = np.empty((num_images, out.pool.shape[1]), dtype=np.float32)
            logits = np.empty((num_images, out.logits.shape[1]), dtype=np.float32)
            if out.spatial is not None:
                spatial = np.empty((num_images, out.spatial.shape[1]), dtype=np.float32)
        stop = start + batch.shape[0]
        pool[start:stop] = out.pool.detach().float().cpu().numpy()
        logits[start:stop] = out.logits.detach().float().cpu().numpy()
        if spatial is not None:
            spatial[start:stop] = out.spatial.detach().float().cpu().numpy()
        start = stop
        bar.update(batch.shape[0])
    bar.close()
    return FeatureArrays(pool=pool, logits=logits, spatial=spatial)
