"""The HDF5 latent cache: its layout (see docs/CACHE_FORMAT.md) and the training-time reader.

Each item stores the autoencoder's posterior mean and std for the image AND for its horizontal
flip, in float16: `moments[i, flip, 0]` is the mean, `moments[i, flip, 1]` the std. Every read
draws a flip and a fresh posterior sample, z = mean + std * noise, normalised as the network sees it
(datasets/latent_norm.py: the scale factor, or the cache's per-channel statistics), so caching freezes
neither the augmentation nor the VAE sampling noise.

Reads are batched (`__getitems__`, which torch's DataLoader calls with a whole batch of keys) and
go through a read-only memory map of the contiguous `moments` dataset, so a batch is one numpy
gather instead of one HDF5 call per item.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.image_codec import decode_image
from datasets.latent_norm import LatentNorm

FORMAT_VERSION = 1

# Datasets of a finished cache file.
MOMENTS = "moments"  # float16 [N, 2 flips, 2 (mean, std), C, h, w]
LABELS = "labels"  # int64 [N]
PATHS = "paths"  # utf-8 strings [N], relative to the image root ("class/file.JPEG" or "digits/<i>")
CLASS_NAMES = "class_names"  # utf-8 strings [num_classes], label order
SKIPPED_PATHS = "skipped_paths"  # utf-8 strings [K]: listed files that could not be decoded
SKIPPED_REASONS = "skipped_reasons"  # utf-8 strings [K]: why
IMAGES = "images"  # variable-length uint8 [N]: each item's encoded crop (extract.store_images), optional

FLIP_NONE, FLIP_HORIZONTAL = 0, 1  # axis 1 of MOMENTS
MEAN, STD = 0, 1  # axis 2 of MOMENTS

# Extraction in progress lives next to the cache in "<cache_path>.parts/" (see cache_writer).
PARTS_SUFFIX = ".parts"


def parts_folder(cache_path: str | os.PathLike) -> Path:
    return Path(str(cache_path) + PARTS_SUFFIX)


def read_cache_info(path: str | os.PathLike) -> dict:
    """The cache's metadata; FileNotFoundError / ValueError with what to do when it is not usable."""
    path = Path(path)
    if not path.is_file():
        if parts_folder(path).is_dir():
            raise FileNotFoundError(
                f"latent cache {path} is not finished (extraction in progress or interrupted, parts in "
                f"{parts_folder(path)}): re-run `python main.py -c CONFIG -p extract` to complete it"
            )
        raise FileNotFoundError(f"latent cache {path} not found: run `python main.py -c CONFIG -p extract` first")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 latent cache ({err}); delete it and re-run -p extract") from None
    with handle:
        attrs = handle.attrs
        if "format_version" not in attrs or MOMENTS not in handle:
            raise ValueError(f"{path} is an HDF5 file but not a latent cache (no format_version / moments)")
        version = int(attrs["format_version"])
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} has cache format {version}; this code reads up to {FORMAT_VERSION}: update it")
        if not bool(attrs.get("complete", False)):
            raise ValueError(f"{path} is an unfinished latent cache: delete it and re-run -p extract")
        return {
            "format_version": version,
            "source": str(attrs["source"]),
            "autoencoder": str(attrs["autoencoder"]),
            "scale_factor": float(attrs["scale_factor"]),
            "image_size": int(attrs["image_size"]),
            "latent_shape": tuple(int(v) for v in attrs["latent_shape"]),
            "num_classes": int(attrs["num_classes"]),
            "max_label": int(handle[LABELS][()].max()) if handle[LABELS].shape[0] else -1,
            "class_names": [_text(name) for name in handle[CLASS_NAMES][()]],
            "num_items": int(attrs["num_items"]),
            "num_skipped": int(attrs["num_skipped"]),
            "num_listed": int(attrs["num_listed"]),
            "item_list_sha256": str(attrs["item_list_sha256"]),
            "precision": str(attrs["precision"]),
            "image_root": str(attrs["image_root"]),
            "latent_mean": [float(v) for v in attrs["latent_mean"]] if "latent_mean" in attrs else None,
            "latent_std": [float(v) for v in attrs["latent_std"]] if "latent_std" in attrs else None,
            "image_format": str(attrs["store_images"]) if IMAGES in handle else None,
        }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LatentDataset(Dataset):
    """Cached latents -> (latent float32 [C,h,w], label int64 tensor), and with `images` also the item's stored
    crop uint8 [3 or 1, H, W] with the latent's flip (decoded here, in the DataLoader workers).

    Keys: an int index draws the flip and the posterior noise from torch's global RNG; a tuple
    (index, draw_seed) draws them from torch.Generator().manual_seed(draw_seed) -- first the flip
    (if random_flip), then the noise (if sample_posterior) -- so the same key always gives the
    same latent, whatever the worker, batch or process. `indices` restricts the dataset to a
    subset (position k is cache item indices[k]), e.g. to keep a holdout out.

    The file is opened lazily in each process that reads (DataLoader workers included) and never
    in __init__, so forking workers is safe. in_memory=True copies the moments into RAM in
    __init__ instead (forked workers share those pages).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        sample_posterior: bool = True,
        random_flip: bool = True,
        in_memory: bool = False,
        indices: Sequence[int] | None = None,
        norm: LatentNorm | None = None,
        images: bool = False,
    ):
        self.path = str(path)
        self.info = read_cache_info(path)
        self.sample_posterior = bool(sample_posterior)
        self.random_flip = bool(random_flip)
        self.scale_factor = self.info["scale_factor"]
        self.norm = norm if norm is not None else LatentNorm.scalar(self.scale_factor)
        if images and self.info["image_format"] is None:
            raise ValueError(f"the cache {path} holds no images, which representation alignment needs: add them "
                             "with `python main.py -c CONFIG -p extract extract.store_images=jpeg` (the latents are "
                             "kept, only the images are read and added)")
        self.with_images = bool(images)
        self._image_rows = None
        self.latent_shape = self.info["latent_shape"]
        num_items = self.info["num_items"]
        if indices is None:
            self.items = None
        else:
            self.items = np.asarray(list(indices), dtype=np.int64)
            if len(self.items) and (self.items.min() < 0 or self.items.max() >= num_items):
                raise IndexError(f"indices must lie in [0, {num_items}) for the cache {path}")
        with h5py.File(self.path, "r") as handle:
            labels = handle[LABELS][()].astype(np.int64)
        self.labels = torch.from_numpy(labels if self.items is None else labels[self.items])
        self._array = None  # moments: in-RAM array, memory map, or h5py dataset
        self._file = None
        self._pid = None
        if in_memory:
            self._array = self._load_into_memory()
            self._pid = "in-memory"

    @classmethod
    def from_config(cls, data, norm: LatentNorm | None = None, images: bool = False) -> "LatentDataset":
        """The training view of `data.cache_path` as the `data` config section sets it up, normalised by `norm`
        (the cache's scale factor when None), with the stored crops when `images`."""
        return cls(data.cache_path, sample_posterior=data.sample_posterior, random_flip=data.random_flip,
                   in_memory=data.in_memory, norm=norm, images=images)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch in one gather; torch's DataLoader calls this with the batch's keys."""
        positions, flips, noise = self._draw(keys)
        moments = torch.from_numpy(self._take(positions, flips.numpy())).float()  # [B, 2 (mean, std), C, h, w]
        mean, std = moments[:, MEAN], moments[:, STD]
        latent = torch.addcmul(mean, std, noise) if noise is not None else mean.clone()
        latent = self.norm.normalize(latent)
        labels = self.labels[torch.from_numpy(positions)]
        if self.with_images:
            return list(zip(latent.unbind(0), labels.unbind(0), self._crops(positions, flips.numpy())))
        return list(zip(latent.unbind(0), labels.unbind(0)))

    def _crops(self, positions: np.ndarray, flips: np.ndarray) -> list[torch.Tensor]:
        """The stored crop of each row, flipped horizontally where its latent is the flip's."""
        if self._image_rows is None or self._image_rows[1] != os.getpid():
            self._image_rows = (h5py.File(self.path, "r")[IMAGES], os.getpid())
        rows = positions if self.items is None else self.items[positions]
        unique, inverse = np.unique(rows, return_inverse=True)
        encoded = self._image_rows[0][unique]
        crops = []
        for j, row in enumerate(inverse):
            pixels = decode_image(encoded[row])
            crops.append(torch.from_numpy(np.array(pixels[..., ::-1] if flips[j] else pixels)))
        return crops

    def _draw(self, keys: list) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
        """Positions, flips [B] and posterior noise [B,C,h,w] (None without posterior sampling)."""
        count = len(keys)
        positions = np.empty(count, dtype=np.int64)
        flips = torch.zeros(count, dtype=torch.long)
        noise = torch.empty((count, *self.latent_shape)) if self.sample_posterior else None
        unseeded = []
        for j, key in enumerate(keys):
            if isinstance(key, (tuple, list)):
                index, seed = key
                generator = torch.Generator().manual_seed(int(seed))
                if self.random_flip:
                    flips[j] = torch.randint(0, 2, (1,), generator=generator)[0]
                if noise is not None:
                    torch.randn(self.latent_shape, generator=generator, out=noise[j])
            else:
                index = key
                unseeded.append(j)
            positions[j] = self._position(index)
        if unseeded:  # one call each on the global RNG for all unseeded keys of the batch
            if self.random_flip:
                flips[unseeded] = torch.randint(0, 2, (len(unseeded),))
            if noise is not None:
                noise[unseeded] = torch.randn((len(unseeded), *self.latent_shape))
        return positions, flips, noise

    def _position(self, index) -> int:
        index = int(index)
        if not 0 <= index < len(self.labels):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.labels)} items")
        return index

    def _take(self, positions: np.ndarray, flips: np.ndarray) -> np.ndarray:
        """moments[item(position), flip] for each row: float16 [B, 2, C, h, w]."""
        array = self._moments()
        if self._pid == "in-memory":
            return array[positions, flips]
        rows = positions if self.items is None else self.items[positions]
        if isinstance(array, np.ndarray):  # memory map
            return array[rows, flips]
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing, distinct indices
        return array[unique][inverse, flips]

    def _moments(self):
        """The moments, opened once per process (a forked worker re-opens its own)."""
        if self._pid == "in-memory":
            return self._array
        if self._pid != os.getpid():
            self._array, self._file = _open_moments(self.path)
            self._pid = os.getpid()
        return self._array

    def _load_into_memory(self) -> np.ndarray:
        array, handle = _open_moments(self.path)
        try:
            if self.items is None:
                return np.array(array[...] if handle is not None else array)
            if handle is None:
                return np.array(array[self.items])
            unique, inverse = np.unique(self.items, return_inverse=True)
            return array[unique][inverse]
        finally:
            if handle is not None:
                handle.close()

    def __getstate__(self) -> dict:
        """Pickling (spawned workers) never carries an open file or a memory map."""
        state = self.__dict__.copy()
        if state["_pid"] != "in-memory":
            state.update(_array=None, _file=None, _pid=None)
        state["_image_rows"] = None
        return state


def _open_moments(path: str):
    """(array, open h5py file or None): a read-only memory map when the dataset is contiguous
    and unfiltered (how the writer makes it), else the h5py dataset itself."""
    handle = h5py.File(path, "r")
    dataset = handle[MOMENTS]
    offset = dataset.id.get_offset() if dataset.chunks is None else None
    if offset is None:
        return dataset, handle
    array = np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)
    handle.close()
    return array, None
