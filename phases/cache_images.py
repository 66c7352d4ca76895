"""The crops a latent cache stores for representation alignment (`extract.store_images: jpeg | png`).

A new extraction stores them with the latents (phases/extract.py). A finished cache without them gets them
here, without encoding a latent again: `extract` with store_images set reads the cache's items back from the
image folder (the same list: the cache's fingerprint is checked first), encodes their ADM crops in parts
(`<cache>.images.parts/`, each written atomically: a killed run resumes, any number of processes), then writes
a copy of the cache with the images added and renames it over the cache (the cache is never half-updated).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from datasets.cache_writer import (
    check_settings, num_parts, part_path, part_range, read_manifest, read_part_errors, read_part_images, write_manifest,
    write_part,
)
from datasets.image_codec import encode_image
from datasets.latent_cache import IMAGES, PATHS, read_cache_info
from runtime import distributed as dist
from runtime.atomic_file import publish, remove_stale_temporaries, temporary_name
from runtime.console import info, progress_bar
from runtime.preemption import Preempted, StopSignals


def image_settings(cfg: DictConfig) -> dict:
    """What the stored crops depend on (nothing when none are stored)."""
    ec = cfg.extract
    if ec.store_images == "none":
        return {}
    return {"store_images": str(ec.store_images), **({"jpeg_quality": int(ec.jpeg_quality)} if ec.store_images == "jpeg" else {})}


def images_folder(cache_path: Path) -> Path:
    return Path(str(cache_path) + ".images.parts")


def add_images(cfg: DictConfig, source, cache_path: Path) -> None:
    """Every rank: store the crops of a finished cache's items in it (resumable, see the module docstring)."""
    settings = {**image_settings(cfg), "item_list_sha256": read_cache_info(cache_path)["item_list_sha256"]}
    rows = _source_rows(cache_path, source)
    part_size = cfg.extract.batch_size * cfg.extract.flush_every
    folder = images_folder(cache_path)
    if dist.is_main():
        manifest = read_manifest(folder)
        if manifest is None:
            write_manifest(folder, {**settings, "part_size": part_size})
        else:
            check_settings(settings, manifest, folder)
            part_size = int(manifest["part_size"])
        remove_stale_temporaries(folder)
    part_size = dist.broadcast_object(part_size)
    total = num_parts(part_size, len(rows))
    mine = [p for p in range(dist.rank(), total, dist.world_size()) if not part_path(folder, p).is_file()]
    done = sum(part_path(folder, p).is_file() for p in range(total))
    info(f"adding the {cfg.extract.store_images} crops of {len(rows)} items to {cache_path} (its latents are kept); "
         f"{done} of {total} parts already done")
    _encode_parts(cfg, source, rows, folder, part_size, mine)
    dist.barrier()
    if dist.is_main():
        _publish(cache_path, folder, part_size, len(rows), settings)
    dist.barrier()


def _source_rows(cache_path: Path, source) -> list[int]:
    """The source index of every cache item, in cache order (the cache keeps the decodable items only)."""
    with h5py.File(cache_path, "r") as handle:
        paths = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in handle[PATHS][()]]
    index = {path: i for i, path in enumerate(source.paths)}
    missing = [p for p in paths if p not in index]
    if missing:
        raise ValueError(f"{len(missing)} items of {cache_path} are not in the image folder any more (e.g. {missing[0]}): "
                         "extract a new cache instead")
    return [index[p] for p in paths]


def _encode_parts(cfg, source, rows: list[int], folder: Path, part_size: int, parts: list[int]) -> None:
    store = (cfg.extract.store_images, cfg.extract.jpeg_quality)
    batches = [list(r[i:i + cfg.extract.batch_size]) for p in parts for r in [part_range(p, part_size, len(rows))]
               for i in range(0, len(r), cfg.extract.batch_size)]
    if not batches:
        return
    loader = iter(DataLoader(Subset(source, rows), batch_sampler=batches, num_workers=cfg.extract.num_workers))
    bar = progress_bar(sum(len(b) for b in batches), 0, "images", dist.is_main())
    with StopSignals() as signals:
        for part in parts:
            items = part_range(part, part_size, len(rows))
            crops, errors = [], []
            while len(crops) < len(items):
                _, images, batch_errors = next(loader)
                crops += [encode_image(image.numpy(), *store) for image in images]
                errors += list(batch_errors)
                bar.update(len(images))
            write_part(part_path(folder, part), None, errors, items.start, images=crops)
            if signals.received:
                bar.close()
                raise Preempted(f"stopped on {signals.name} with the finished parts kept in {folder}; re-run the same "
                                "command to continue", signals.received)
    bar.close()


def _publish(cache_path: Path, folder: Path, part_size: int, count: int, settings: dict) -> None:
    """A copy of the cache with the crops, renamed over it; then the parts go."""
    failed = [e for p in range(num_parts(part_size, count)) for e in
              read_part_errors(part_path(folder, p), part_range(p, part_size, count)) if e]
    if failed:
        raise ValueError(f"{len(failed)} images of the cache can no longer be read ({failed[0]}): extract a new cache")
    tmp = temporary_name(cache_path)
    try:
        shutil.copyfile(cache_path, tmp)
        with h5py.File(tmp, "r+") as handle:
            stored = handle.create_dataset(IMAGES, shape=(count,), dtype=h5py.vlen_dtype(np.uint8))
            for part in range(num_parts(part_size, count)):
                start = part_range(part, part_size, count).start
                for offset, data in enumerate(read_part_images(part_path(folder, part))):
                    stored[start + offset] = data
            for key, value in settings.items():
                if key != "item_list_sha256":
                    handle.attrs[key] = value
        publish(tmp, cache_path)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(folder)
    info(f"added {count} crops to {cache_path}")
