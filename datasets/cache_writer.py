"""Writing the latent cache: durable parts while extracting, then one self-contained file.

While extracting, the item list is cut into fixed parts of `part_size` consecutive items
("<cache_path>.parts/part000123.h5"); each part file is written to a temporary name and renamed,
so a part that exists is complete, whatever happened to the process. A manifest in the same folder
records what the parts were made from, so parts from another setup are never mixed in. At the
end the parts are copied, in item order and without the skipped files, into one HDF5 file that is
itself written to a temporary name and renamed into place (layout in docs/CACHE_FORMAT.md).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from datasets.latent_norm import ChannelMoments
from runtime.atomic_file import publish, temporary_name, write_text_atomic
from datasets.latent_cache import (
    CLASS_NAMES,
    FORMAT_VERSION,
    IMAGES,
    LABELS,
    MOMENTS,
    PATHS,
    SKIPPED_PATHS,
    SKIPPED_REASONS,
)

MANIFEST = "manifest.json"
PART_ERRORS = "errors"  # utf-8 strings [n] in a part file: "" when the item was encoded, else why not
_STRINGS = h5py.string_dtype("utf-8")
_BYTES = h5py.vlen_dtype(np.uint8)  # an encoded image per row


def item_list_sha256(source: str, paths: Sequence[str], labels: Sequence[int]) -> str:
    """Fingerprint of the ordered item list: one changed, added or removed image changes it."""
    digest = hashlib.sha256(source.encode("utf-8"))
    for path, label in zip(paths, labels):
        digest.update(f"\n{int(label)}\t{path}".encode("utf-8"))
    return digest.hexdigest()


def settings_mismatch(expected: dict, found: dict) -> list[str]:
    """Readable differences between two settings dicts, over the keys both have."""
    problems = []
    for key in expected:
        if key in found and _plain(expected[key]) != _plain(found[key]):
            if key == "item_list_sha256":
                problems.append("the list of images differs (files or labels were added, removed or renamed)")
            else:
                problems.append(f"{key} {_plain(found[key])!r} there vs {_plain(expected[key])!r} now")
    return problems


def _plain(value):
    """Comparable plain Python value (numpy scalars/arrays, tuples -> int/float/str/list)."""
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def check_settings(expected: dict, found: dict, where: Path) -> None:
    """ValueError naming every mismatch between what `where` was made with and the current setup."""
    problems = settings_mismatch(expected, found)
    if problems:
        raise ValueError(
            f"{where} was made with a different setup: " + "; ".join(problems)
            + f". Delete {where} to start over, or choose another data.cache_path."
        )


# ---- parts -----------------------------------------------------------------------------------


def part_path(folder: Path, part: int) -> Path:
    return folder / f"part{part:06d}.h5"


def part_range(part: int, part_size: int, num_items: int) -> range:
    return range(part * part_size, min((part + 1) * part_size, num_items))


def num_parts(part_size: int, num_items: int) -> int:
    return -(-num_items // part_size)


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); delete {folder} to start the extraction over") from None


def write_manifest(folder: Path, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def write_part(path: Path, moments: np.ndarray | None, errors: Sequence[str], first_item: int,
               images: Sequence[np.ndarray] | None = None) -> None:
    """One finished part: moments float16 [n,2,2,C,h,w] (zeros where errors[i] != "") and/or the items' encoded
    images (datasets/image_codec.py; empty where errors[i] != "")."""
    if moments is not None and len(moments) != len(errors):
        raise ValueError(f"{len(moments)} moments for {len(errors)} items")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with h5py.File(tmp, "w") as handle:
            if moments is not None:
                handle.create_dataset(MOMENTS, data=np.asarray(moments, dtype=np.float16))
            if images is not None:
                write_images(handle, IMAGES, images)
            handle.create_dataset(PART_ERRORS, data=np.array(list(errors), dtype=object), dtype=_STRINGS)
            handle.attrs["first_item"] = int(first_item)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_part_errors(path: Path, expected: range) -> list[str]:
    with h5py.File(path, "r") as handle:
        if int(handle.attrs["first_item"]) != expected.start or len(handle[PART_ERRORS]) != len(expected):
            raise ValueError(f"{path} does not hold items {expected.start}..{expected.stop - 1}; delete {path.parent}")
        return [e.decode("utf-8") if isinstance(e, bytes) else str(e) for e in handle[PART_ERRORS][()]]


def read_part_moments(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return handle[MOMENTS][()]


def read_part_images(path: Path) -> list[np.ndarray]:
    with h5py.File(path, "r") as handle:
        return list(handle[IMAGES][()])


def write_images(handle, name: str, images: Sequence[np.ndarray]) -> None:
    """A variable-length uint8 dataset of encoded images, one row per item."""
    dataset = handle.create_dataset(name, shape=(len(images),), dtype=_BYTES)
    for i, data in enumerate(images):
        dataset[i] = np.asarray(data, dtype=np.uint8)


# ---- the final file ----------------------------------------------------------------------------


def write_cache(
    path: Path,
    blocks: Iterable[np.ndarray],
    labels: np.ndarray,
    paths: Sequence[str],
    class_names: Sequence[str],
    attrs: dict,
    skipped_paths: Sequence[str] = (),
    skipped_reasons: Sequence[str] = (),
    images: Iterable[Sequence[np.ndarray]] | None = None,
) -> None:
    """Write a finished cache atomically: `blocks` are consecutive float16 [n,2,2,C,h,w] slices.

    `attrs` must hold source, autoencoder, scale_factor, image_size, latent_shape, precision,
    item_list_sha256, num_listed and image_root; format_version, num_items, num_classes,
    num_skipped, complete and the per-channel latent statistics (latent_mean, latent_std over every
    item and both flips: datasets/latent_norm.py) are added here.
    """
    path = Path(path)
    num_items = len(labels)
    if num_items == 0:
        raise ValueError(f"no item to write into {path}: every listed image was skipped")
    shape = (num_items, 2, 2, *(int(v) for v in attrs["latent_shape"]))
    tmp = temporary_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as handle:
            # Contiguous and unfiltered on purpose: the reader memory-maps it (see latent_cache).
            moments = handle.create_dataset(MOMENTS, shape=shape, dtype=np.float16)
            filled, statistics = 0, ChannelMoments()
            for block in blocks:
                if len(block) == 0:
                    continue
                moments[filled : filled + len(block)] = block
                statistics.add(block)
                filled += len(block)
            if filled != num_items:
                raise ValueError(f"got moments for {filled} items, expected {num_items}")
            if images is not None:  # streamed block by block: ImageNet's crops do not fit in memory
                stored = handle.create_dataset(IMAGES, shape=(num_items,), dtype=_BYTES)
                row = 0
                for block in images:
                    for data in block:
                        stored[row] = np.asarray(data, dtype=np.uint8)
                        row += 1
                if row != num_items:
                    raise ValueError(f"got images for {row} items, expected {num_items}")
            handle.create_dataset(LABELS, data=np.asarray(labels, dtype=np.int64))
            handle.create_dataset(PATHS, data=_strings(paths), dtype=_STRINGS)
            handle.create_dataset(CLASS_NAMES, data=_strings(class_names), dtype=_STRINGS)
            handle.create_dataset(SKIPPED_PATHS, data=_strings(skipped_paths), dtype=_STRINGS)
            handle.create_dataset(SKIPPED_REASONS, data=_strings(skipped_reasons), dtype=_STRINGS)
            for key, value in attrs.items():
                handle.attrs[key] = value
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["num_items"] = num_items
            handle.attrs["num_classes"] = len(class_names)
            handle.attrs["num_skipped"] = len(skipped_paths)
            handle.attrs["latent_mean"], handle.attrs["latent_std"] = statistics.result()
            handle.attrs["complete"] = True
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def assemble_parts(
    cache_path: Path,
    folder: Path,
    part_size: int,
    paths: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    attrs: dict,
    not_listed: Sequence[tuple[str, str]] = (),
) -> tuple[int, list[tuple[str, str]]]:
    """Copy every part, in item order and without skipped items, into `cache_path`.

    Returns (items written, [(path, reason) of each skipped file]): `not_listed` (files the folder
    scan left out, e.g. a second link to the same file) first, then the files that failed to decode.
    """
    listed = len(paths)
    keep = np.ones(listed, dtype=bool)
    skipped = list(not_listed)
    for part in range(num_parts(part_size, listed)):
        items = part_range(part, part_size, listed)
        for item, error in zip(items, read_part_errors(part_path(folder, part), items)):
            if error:
                keep[item] = False
                skipped.append((paths[item], error))

    def blocks():
        for part in range(num_parts(part_size, listed)):
            items = part_range(part, part_size, listed)
            yield read_part_moments(part_path(folder, part))[keep[items.start : items.stop]]

    def image_blocks():
        for part in range(num_parts(part_size, listed)):
            items = part_range(part, part_size, listed)
            data = read_part_images(part_path(folder, part))
            yield [d for d, kept in zip(data, keep[items.start : items.stop]) if kept]

    kept = np.flatnonzero(keep)
    write_cache(
        cache_path,
        blocks(),
        labels=np.asarray(labels)[kept],
        paths=[paths[i] for i in kept],
        class_names=class_names,
        attrs=attrs,
        skipped_paths=[p for p, _ in skipped],
        skipped_reasons=[r for _, r in skipped],
        images=image_blocks() if attrs.get("store_images", "none") != "none" else None,
    )
    return len(kept), skipped


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object).reshape(len(values))
