"""Reading ADM-format `.npz` files: images (arr_0), labels (arr_1), precomputed statistics.

Layout (spec section 5): `arr_0` uint8 [N, H, W, 3] images (NHWC), optional `arr_1` [N] labels,
and/or `mu`, `sigma` (pool_3 statistics) with optional `mu_s`, `sigma_s` (spatial, for sFID),
as in ADM's reference batches. Grayscale [N, H, W, 1] images are accepted too (the CPU demo)
and replicated to RGB by the feature extractor's caller.

Images are streamed batch by batch straight from the zip member (stored or deflated), so a
50K x 256 x 256 x 3 file (9.8 GB) is never held in memory, let alone as floats.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

IMAGES = "arr_0"
LABELS = "arr_1"
POOL_STATS = ("mu", "sigma")
SPATIAL_STATS = ("mu_s", "sigma_s")


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple
    dtype: np.dtype
    fortran_order: bool


@dataclass(frozen=True)
class NpzContents:
    """What an `.npz` holds, read from the member headers only."""

    path: Path
    keys: tuple
    images: Optional[ArrayHeader]  # validated uint8 [N, H, W, C], C in (1, 3)
    has_labels: bool
    has_statistics: bool  # mu and sigma
    has_spatial_statistics: bool  # mu_s and sigma_s

    @property
    def num_images(self) -> int:
        return self.images.shape[0] if self.images is not None else 0


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz (zip) archive; expected the ADM format with arr_0 images")
    return zipfile.ZipFile(path)


def _read_header(member) -> ArrayHeader:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return ArrayHeader(tuple(shape), np.dtype(dtype), bool(fortran_order))


def _check_images(path: Path, header: ArrayHeader) -> None:
    where = f"{path}: {IMAGES}"
    if header.dtype != np.uint8:
        raise ValueError(f"{where} has dtype {header.dtype}; ADM-format images must be uint8 in [0, 255]")
    if len(header.shape) != 4 or header.shape[-1] not in (1, 3):
        channels_first = len(header.shape) == 4 and header.shape[1] in (1, 3)
        hint = " (channels first? ADM-format images are NHWC)" if channels_first else ""
        raise ValueError(f"{where} has shape {header.shape}; expected [N, H, W, 3] (NHWC){hint}")
    if header.shape[0] == 0:
        raise ValueError(f"{where} holds no images")
    if header.fortran_order:
        raise ValueError(f"{where} is stored in Fortran order; save it with np.savez from a C-ordered array")


def inspect_npz(path: str | Path) -> NpzContents:
    """Keys and validated image header of an ADM-format `.npz`, without reading any data."""
    path = Path(path)
    with _open_zip(path) as archive:
        keys = tuple(name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy"))
        images = None
        if IMAGES in keys:
            with archive.open(f"{IMAGES}.npy") as member:
                images = _read_header(member)
            _check_images(path, images)
        if LABELS in keys and images is not None:
            with archive.open(f"{LABELS}.npy") as member:
                labels = _read_header(member)
            if labels.shape != (images.shape[0],):
                raise ValueError(f"{path}: {LABELS} has shape {labels.shape}, expected ({images.shape[0]},) labels")
    for pair in (POOL_STATS, SPATIAL_STATS):
        if (pair[0] in keys) != (pair[1] in keys):
            raise ValueError(f"{path}: has only one of {pair[0]}/{pair[1]}; both are needed")
    if images is None and POOL_STATS[0] not in keys:
        found = ", ".join(keys) or "none"
        raise ValueError(f"{path} has neither {IMAGES} images nor mu/sigma statistics (keys: {found})")
    return NpzContents(
        path=path,
        keys=keys,
        images=images,
        has_labels=LABELS in keys and images is not None,
        has_statistics=POOL_STATS[0] in keys,
        has_spatial_statistics=SPATIAL_STATS[0] in keys,
    )


def iter_image_batches(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 [B, H, W, C] batches of arr_0 in file order, read sequentially from the zip member."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    path = Path(path)
    contents = inspect_npz(path)
    if contents.images is None:
        raise ValueError(f"{path} has no {IMAGES} images")
    n, *image_shape = contents.images.shape
    image_bytes = int(np.prod(image_shape))
    with _open_zip(path) as archive, archive.open(f"{IMAGES}.npy") as member:
        _read_header(member)  # skip to the data
        for start in range(0, n, batch_size):
            batch = np.empty((min(batch_size, n - start), *image_shape), dtype=np.uint8)
            view, filled = memoryview(batch).cast("B"), 0
            while filled < batch.nbytes:
                got = member.readinto(view[filled:])
                if not got:
                    raise ValueError(f"{path}: {IMAGES} is truncated at image {start + filled // image_bytes} of {n}")
                filled += got
            yield batch


def read_labels(path: str | Path) -> Optional[np.ndarray]:
    """arr_1 labels, or None when the file has none."""
    contents = inspect_npz(path)
    if not contents.has_labels:
        return None
    with np.load(contents.path, allow_pickle=False) as data:
        return data[LABELS]


def _check_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, names: tuple) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{path}: {names[0]} has shape {mu.shape} and {names[1]} {sigma.shape}; expected [D] and [D, D]"
        )


def read_statistics(path: str | Path) -> dict[str, np.ndarray]:
    """Stored mu/sigma (and mu_s/sigma_s when present) as float64; empty when the file has none."""
    contents = inspect_npz(path)
    stats = {}
    with np.load(contents.path, allow_pickle=False) as data:
        for present, names in ((contents.has_statistics, POOL_STATS), (contents.has_spatial_statistics, SPATIAL_STATS)):
            if present:
                mu, sigma = (np.asarray(data[name], dtype=np.float64) for name in names)
                _check_statistics(contents.path, mu, sigma, names)
                stats[names[0]], stats[names[1]] = mu, sigma
    return stats
