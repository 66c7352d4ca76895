"""The `extract` phase: images -> autoencoder posterior of the image and of its flip -> HDF5 cache.

Spec section 6; layout in docs/CACHE_FORMAT.md. Works as one process or under torchrun:

1. Every rank lists the items (sorted, so the same list everywhere) and checks that it is.
2. A finished cache at data.cache_path that matches the setup ends the phase at once; one that
   does not match is an error.
3. The item list is cut into parts of extract.batch_size * extract.flush_every consecutive items
   (the size is fixed by the first run and kept in the manifest); part p belongs to rank
   p % world_size. Batches never straddle a part, so every image is encoded in the same batch
   whatever the number of processes: the cache is identical item by item for any world size.
4. Each finished part is written to its own file and renamed into place: that is the durable
   progress mark. Re-running the command skips existing parts (with any number of processes).
5. Rank 0 copies the parts into one file (temporary name, then rename) and removes the parts.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets.autoencoder import IDENTITY, load_autoencoder
from datasets.cache_writer import (
    assemble_parts,
    check_settings,
    item_list_sha256,
    num_parts,
    part_path,
    part_range,
    read_manifest,
    write_manifest,
    write_part,
)
from datasets.digits import DigitsSource
from datasets.image_codec import encode_image
from datasets.image_folder import ImageFolderSource
from datasets.latent_cache import FORMAT_VERSION, parts_folder, read_cache_info
from phases.cache_images import add_images, image_settings
from runtime import distributed as dist
from runtime.atomic_file import remove_stale_temporaries
from runtime.preemption import Preempted, StopSignals
from runtime.run_lock import RunLock
from runtime.config import record_config
from runtime.console import info

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    """Extract (or finish extracting) the latent cache at cfg.data.cache_path; returns its path."""
    dist.init()
    _check_config(cfg)
    source = build_source(cfg)
    fingerprint = item_list_sha256(cfg.data.source, source.paths, source.labels)
    _check_same_items_on_every_rank(fingerprint)
    cache_path = Path(cfg.data.cache_path)
    folder = parts_folder(cache_path)

    with RunLock.for_file(cache_path, "data.cache_path"):  # one extraction per cache, for its whole life
        finished = _on_main(lambda: _finished_items(cache_path, folder, expected_settings(cfg, source, fingerprint)))
        if finished is not None:
            if cfg.extract.store_images != "none" and _on_main(lambda: read_cache_info(cache_path)["image_format"]) is None:
                add_images(cfg, source, cache_path)  # the latents stay; only the crops are read and added
                return cache_path
            info(f"latent cache {cache_path} is already complete ({finished} items): nothing to do")
            return cache_path
        ae = load_autoencoder(cfg.autoencoder.name, dist.device(), cfg.autoencoder.scale_factor, cfg.extract.precision)
        if dist.is_main():
            record_config(cfg, "extract")
        _extract(cfg, source, ae, cache_path, folder, expected_settings(cfg, source, fingerprint, ae))
    return cache_path


def _extract(cfg: DictConfig, source, ae, cache_path: Path, folder: Path, settings: dict) -> None:
    """Encode the parts still missing (this rank's share), then rank 0 assembles the cache."""
    part_size = cfg.extract.batch_size * cfg.extract.flush_every
    manifest = _on_main(lambda: _prepare_parts(cache_path, folder, settings, part_size))
    part_size = int(manifest["part_size"])
    total_parts = num_parts(part_size, len(source))
    mine = [p for p in range(dist.rank(), total_parts, dist.world_size()) if not part_path(folder, p).is_file()]
    done = sum(len(part_range(p, part_size, len(source))) for p in range(total_parts) if part_path(folder, p).is_file())
    info(
        f"extracting {len(source)} images ({cfg.data.source}, {cfg.data.image_size}px) with {ae.name} "
        f"({settings['precision']}) into {cache_path}: latent {tuple(settings['latent_shape'])} x 2 flips, "
        f"{dist.world_size()} process(es), {done} already done"
    )
    start = time.perf_counter()
    _encode_parts(cfg, source, ae, folder, part_size, mine, settings["latent_shape"])  # (+ the crops, if stored)
    encoded = sum(len(part_range(p, part_size, len(source))) for p in mine)
    if encoded:
        seconds = time.perf_counter() - start
        info(f"encoded {encoded} images in {seconds:.1f} s on rank 0 ({encoded / seconds:.1f} img/s: read, decoded, "
             "cropped, both flips encoded, written)")

    dist.barrier()
    _on_main(lambda: _assemble(cfg, source, cache_path, folder, settings, part_size))


def build_source(cfg: DictConfig):
    """The images to encode: an ImageNet-style folder or the scikit-learn digits demo."""
    if cfg.data.source == "digits":
        return DigitsSource(cfg.data.image_size)
    if cfg.data.source == "folder":
        return ImageFolderSource(cfg.data.image_root, cfg.data.image_size)
    raise ValueError(f"data.source={cfg.data.source!r} is not one of folder, digits")


def expected_settings(cfg: DictConfig, source, fingerprint: str, ae=None) -> dict:
    """What a cache (or parts) must have been made with to be reused; more keys once `ae` is loaded."""
    identity = cfg.autoencoder.name == IDENTITY
    bf16 = cfg.extract.precision == "bf16" and dist.device().type == "cuda" and not identity
    settings = {
        "format_version": FORMAT_VERSION,
        "source": str(cfg.data.source),
        "autoencoder": str(cfg.autoencoder.name),
        "image_size": int(cfg.data.image_size),
        "precision": "bf16" if bf16 else "fp32",
        "item_list_sha256": fingerprint,
        "num_listed": len(source),
    }
    settings.update(image_settings(cfg))
    if ae is not None:
        settings["scale_factor"] = float(ae.scale_factor)
        settings["latent_shape"] = latent_shape(ae, source.channels, int(cfg.data.image_size))
    elif cfg.autoencoder.scale_factor is not None or identity:
        settings["scale_factor"] = 1.0 if cfg.autoencoder.scale_factor is None else float(cfg.autoencoder.scale_factor)
    return settings


def latent_shape(ae, channels: int, image_size: int) -> list[int]:
    """(C, h, w) of the cached moments for images of `channels` x image_size^2."""
    if ae.latent_channels is None:  # identity: the image itself
        return [channels, image_size, image_size]
    if image_size % ae.downsample:
        raise ValueError(f"data.image_size={image_size} is not a multiple of {ae.name}'s downsampling {ae.downsample}")
    if channels not in (ae.in_channels, 1):
        raise ValueError(f"{ae.name} takes {ae.in_channels}-channel images, the source gives {channels}")
    side = image_size // ae.downsample
    return [ae.latent_channels, side, side]


def encode_both_flips(ae, pixels: torch.Tensor) -> torch.Tensor:
    """float16 [B, 2 flips, 2 (mean, std), C, h, w]: the image and its horizontal flip, each encoded.

    The VAE is not flip-equivariant, so the flip is encoded, never obtained by flipping latents.
    """
    if pixels.shape[1] == 1 and ae.in_channels not in (None, 1):
        pixels = pixels.expand(-1, ae.in_channels, -1, -1)  # grey digits through an RGB VAE
    mean, std = ae.encode(torch.cat([pixels, pixels.flip(-1)]))
    count = len(pixels)
    moments = torch.stack([torch.stack([mean[:count], std[:count]], 1), torch.stack([mean[count:], std[count:]], 1)], 1)
    return moments.to(torch.float16)


def _encode_parts(cfg, source, ae, folder: Path, part_size: int, parts: list[int], shape) -> None:
    """Encode this rank's `parts` in order and write each one as soon as it is complete."""
    batch_size = cfg.extract.batch_size
    batches = []
    for part in parts:
        items = part_range(part, part_size, len(source))
        batches += [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    if not batches:
        return
    device = dist.device()
    loader = DataLoader(
        source, batch_sampler=batches, num_workers=cfg.extract.num_workers, pin_memory=device.type == "cuda"
    )
    desc = "extract" if dist.world_size() == 1 else f"extract (rank 0 of {dist.world_size()})"
    bar = tqdm(
        total=sum(len(b) for b in batches), desc=desc, unit="img", disable=not dist.is_main(),
        file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
    )
    loaded = iter(loader)
    store = (cfg.extract.store_images, cfg.extract.jpeg_quality)
    with StopSignals() as signals:
        for part in parts:
            _encode_part(source, ae, folder, part, part_size, shape, batch_size, loaded, bar, device, store)
            if signals.received:  # each rank stops at its next part: finished parts are kept
                bar.close()
                raise Preempted(f"stopped on {signals.name} with the finished parts kept in {folder}; re-run the "
                                "same command to continue", signals.received)
    bar.close()


def _encode_part(source, ae, folder: Path, part: int, part_size: int, shape, batch_size: int, loaded, bar, device,
                 store: tuple) -> None:
    """Encode one part from the loader and write it (its file is the durable progress mark); with
    store = (format, quality) not ("none", _) also the encoded crops."""
    items = part_range(part, part_size, len(source))
    moments = np.zeros((len(items), 2, 2, *shape), dtype=np.float16)
    errors = [""] * len(items)
    crops = [np.zeros(0, np.uint8)] * len(items) if store[0] != "none" else None
    for _ in range(0, len(items), batch_size):
        indices, images, batch_errors = next(loaded)
        offsets = indices.numpy() - items.start
        ok = [j for j, error in enumerate(batch_errors) if not error]
        for j, error in enumerate(batch_errors):
            if error:
                errors[offsets[j]] = error
                log.warning("skipping unreadable image %s: %s", source.paths[int(indices[j])], error)
        if ok:
            pixels = images[ok].to(device, non_blocking=True).float() / 127.5 - 1.0  # ToTensor + Normalize(0.5, 0.5)
            moments[offsets[ok]] = encode_both_flips(ae, pixels).cpu().numpy()
            if crops is not None:
                for j in ok:
                    crops[offsets[j]] = encode_image(images[j].numpy(), *store)
        bar.update(len(indices))
    write_part(part_path(folder, part), moments, errors, items.start, images=crops)


def _finished_items(cache_path: Path, folder: Path, expected: dict) -> int | None:
    """Item count of a finished cache made with this setup; None when there is none yet."""
    if not cache_path.exists():
        return None
    try:
        found = read_cache_info(cache_path)
    except ValueError as err:
        raise ValueError(f"{err} (or choose another data.cache_path)") from None
    check_settings(expected, found, cache_path)
    if folder.is_dir():  # left over by a run stopped between the final rename and the clean-up
        shutil.rmtree(folder)
    return found["num_items"]


def _prepare_parts(cache_path: Path, folder: Path, settings: dict, part_size: int) -> dict:
    """Create the manifest, or check that the existing parts were made with this setup."""
    manifest = read_manifest(folder)
    if manifest is None:
        if folder.is_dir() and any(folder.glob("part*.h5")):
            raise ValueError(f"{folder} holds parts but no manifest: delete {folder} to start over")
        manifest = {**settings, "part_size": part_size}
        write_manifest(folder, manifest)
    else:
        check_settings(settings, manifest, folder)
        if int(manifest["part_size"]) != part_size:
            info(f"resuming with the part size of the first run ({manifest['part_size']} items per part)")
    remove_stale_temporaries(folder)
    for stale in cache_path.parent.glob(f".{cache_path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    return manifest


def _assemble(cfg, source, cache_path: Path, folder: Path, settings: dict, part_size: int) -> None:
    missing = [p for p in range(num_parts(part_size, len(source))) if not part_path(folder, p).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} part(s) missing in {folder} (a process failed?): re-run the extract phase")
    image_root = str(Path(cfg.data.image_root).expanduser().resolve()) if cfg.data.source == "folder" else ""
    attrs = {**settings, "image_root": image_root}
    count, skipped = assemble_parts(
        cache_path, folder, part_size, source.paths, source.labels, source.class_names, attrs,
        not_listed=getattr(source, "skipped", ()),
    )
    shutil.rmtree(folder)
    size_gb = cache_path.stat().st_size / 1e9
    info(f"wrote {cache_path}: {count} items, {len(source.class_names)} classes, {size_gb:.3f} GB")
    if skipped:
        shown = "; ".join(f"{path} ({reason})" for path, reason in skipped[:5])
        info(f"{len(skipped)} file(s) skipped (listed with the reason in the cache's skipped_paths): {shown}")


def _check_config(cfg: DictConfig) -> None:
    positive = {
        "extract.batch_size": cfg.extract.batch_size,
        "extract.flush_every": cfg.extract.flush_every,
        "data.image_size": cfg.data.image_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if cfg.extract.num_workers < 0:
        raise ValueError(f"extract.num_workers must be >= 0, got {cfg.extract.num_workers}")


def _check_same_items_on_every_rank(fingerprint: str) -> None:
    """Every process must list the same images (same folder contents on every node)."""
    if dist.world_size() == 1:
        return
    mine = torch.tensor([int(fingerprint[:15], 16)], dtype=torch.long, device=dist.device())
    every = dist.all_gather_tensor(mine)
    if bool((every != every[0]).any()):
        raise ValueError(
            "the processes list different images: every node must see the same data.image_root contents"
        )


def _on_main(task):
    """Run `task` on rank 0 only and give its result -- or its error -- to every rank,
    so that all ranks go on, or stop with the same message, together."""
    result, error = None, None
    if dist.is_main():
        try:
            result = task()
        except (ValueError, OSError, RuntimeError) as err:
            error = err
    if dist.world_size() > 1:
        result, error = dist.broadcast_object((result, error))
    if error is not None:
        raise error
    return result
