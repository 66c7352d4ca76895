"""Generating an ADM-format `.npz` (arr_0 uint8 NHWC, arr_1 labels) from a loaded generator: the one function
`inference`, the FID sweeps, `train.fid_every` and `distill`'s student FIDs call with their arguments.

Image i uses generator seed `seed + i` and label `labels[i]`, so the file is identical whatever the
number of processes and the batch size. Finished batches are kept as small part files next to the
output, so an interrupted run re-run with the same arguments only generates what is missing; the parts
are merged into the `.npz` in index order by streaming, never holding all images in memory. Parts made
with other settings (the `identity`) are never mixed in.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from phases.generation import Generator, to_pil
from phases.npz_writer import write_npz
from runtime import distributed as dist
from runtime.atomic_file import atomic_write, remove_stale_temporaries
from runtime.console import info, progress_bar
from runtime.preemption import Preempted, StopSignals
from runtime.run_identity import FILE as RUN_FILE, check_run_identity
from runtime.run_lock import RunLock

PART_SUFFIX = ".part.npz"


def sample_labels(num_samples: int, num_classes: int, seed: int, class_balanced: bool) -> torch.Tensor:
    """Label of every image: uniform i.i.d. from a seeded generator, or each class equally often (shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    if class_balanced:
        labels = torch.arange(num_samples) % num_classes
        return labels[torch.randperm(num_samples, generator=generator)]
    return torch.randint(num_classes, (num_samples,), generator=generator)


def inference_identity(cfg: DictConfig, ckpt: Path, settings: DictConfig, num_samples: int) -> dict:
    """What the images of a file depend on (parts made with anything else are not mixed in)."""
    return {"num_samples": num_samples, "seed": cfg.seed, "class_balanced": cfg.inference.class_balanced,
            "checkpoint": str(Path(ckpt).resolve()), "sampler": OmegaConf.to_container(settings),
            "use_ema": cfg.sample.use_ema}


def generate_npz(generator: Generator, labels: torch.Tensor, seed: int, out: Path, identity: dict, batch_size: int,
                 png_dir: Path | None = None) -> Path:
    """Every rank: the images of `labels` (image i from seed + i) into `out`, resuming from finished parts.

    A finished `out` is left as it is. `png_dir` also gets one PNG per image. On a stop signal each rank
    stops at its next part boundary (finished parts are kept) and Preempted is raised.
    """
    out = Path(out)
    if out.exists():
        info(f"{out} already exists (delete it to regenerate)")
    else:
        with RunLock.for_file(out, "inference.output"):  # one run per output file
            _generate(generator, labels, seed, out, identity, batch_size, png_dir)
    dist.barrier()
    return out


def finished_parts(parts_dir: Path) -> dict[Path, np.ndarray]:
    """Indices held by every finished part file (unfinished ones were never renamed into place)."""
    found = {}
    for path in sorted(parts_dir.glob(f"*{PART_SUFFIX}")):
        with np.load(path) as part:
            found[path] = part["indices"]
    return found


def _generate(generator: Generator, labels: torch.Tensor, seed: int, out: Path, identity: dict, batch_size: int,
              png_dir: Path | None) -> None:
    num_samples = len(labels)
    parts_dir = out.with_name(out.name + ".parts")
    if dist.is_main():
        check_run_identity(parts_dir, identity, "images", "delete it or choose another inference.output")
        remove_stale_temporaries(parts_dir)  # half-written parts of a killed run (we hold the lock)
        done = set(np.concatenate(list(finished_parts(parts_dir).values()) or [np.zeros(0, np.int64)]).tolist())
    else:
        done = None
    done = dist.broadcast_object(done)
    todo = [i for i in range(num_samples) if i not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    mine = batches[dist.rank() :: dist.world_size()]
    if done:
        info(f"resuming: {len(done)} of {num_samples} images already generated")
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(num_samples, len(done), "inference", True)
    with StopSignals() as signals:
        for batch in mine:
            images = generator.images(labels[batch], [seed + i for i in batch]).numpy()
            _save_part(parts_dir, batch, images, labels[batch].numpy())
            if png_dir is not None:
                for i, image in zip(batch, images):
                    to_pil(image).save(png_dir / f"{i:06d}.png")
            bar.update(len(batch) * dist.world_size())
            if signals.received:  # each rank stops at its next part: finished parts are kept
                bar.close()
                raise Preempted(f"stopped on {signals.name} with the finished parts kept in {parts_dir}; re-run "
                                "the same command to continue", signals.received)
    bar.close()
    dist.barrier()
    if dist.is_main():
        _assemble(parts_dir, out, num_samples)


def _save_part(parts_dir: Path, indices: list[int], images: np.ndarray, labels: np.ndarray) -> None:
    path = parts_dir / f"{indices[0]:08d}-{len(indices):05d}{PART_SUFFIX}"
    with atomic_write(path) as handle:
        np.savez(handle, images=images, labels=labels, indices=np.asarray(indices, dtype=np.int64))


def _rows_in_order(parts: dict[Path, np.ndarray], num_samples: int, field: str, chunk: int = 1024):
    """Yield `field` rows 0..N-1 in order, loading each part once and dropping it when passed."""
    owner = np.full(num_samples, -1, dtype=np.int64)
    row = np.zeros(num_samples, dtype=np.int64)
    paths = list(parts)
    for p, indices in enumerate(parts.values()):
        owner[indices] = p
        row[indices] = np.arange(len(indices))
    if (owner < 0).any():
        raise RuntimeError(f"{int((owner < 0).sum())} images are missing from the parts")
    last_use = {p: int(np.max(np.nonzero(owner == p)[0])) for p in range(len(paths))}
    loaded: dict[int, np.ndarray] = {}
    for start in range(0, num_samples, chunk):
        stop = min(num_samples, start + chunk)
        out = []
        for i in range(start, stop):
            p = int(owner[i])
            if p not in loaded:
                with np.load(paths[p]) as part:
                    loaded[p] = part[field]
            out.append(loaded[p][row[i]])
        for p in [p for p in loaded if last_use[p] < stop]:
            del loaded[p]
        yield np.stack(out)


def _assemble(parts_dir: Path, out: Path, num_samples: int) -> None:
    parts = finished_parts(parts_dir)
    first = next(iter(parts))
    with np.load(first) as part:
        image_shape = part["images"].shape[1:]
    write_npz(
        out,
        [
            ("arr_0", (num_samples, *image_shape), np.uint8, _rows_in_order(parts, num_samples, "images")),
            ("arr_1", (num_samples,), np.int64, _rows_in_order(parts, num_samples, "labels")),
        ],
    )
    for path in parts:
        path.unlink()
    (parts_dir / RUN_FILE).unlink(missing_ok=True)
    parts_dir.rmdir()
    info(f"wrote {num_samples} images to {out}")
