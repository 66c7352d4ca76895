"""The `inference` phase: `num_samples` images -> one ADM-format `.npz` (arr_0 uint8 NHWC, arr_1 labels).

Image i uses generator seed `seed + i` and label `labels[i]` from a seeded draw, so the file
is identical whatever the number of processes and the batch size. Finished batches are kept
as small part files next to the output, so an interrupted run re-run with the same command
only generates what is missing; the parts are merged into the `.npz` in index order by
streaming, never holding all images in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from phases.generation import load_generator, output_root, to_pil
from phases.npz_writer import write_npz
from runtime import distributed as dist
from runtime.atomic_file import atomic_write, remove_stale_temporaries
from runtime.checkpoint import resolve_checkpoint
from runtime.config import record_config, sampler_settings
from runtime.preemption import Preempted, StopSignals
from runtime.run_identity import FILE as RUN_FILE, check_run_identity
from runtime.run_lock import RunLock
from runtime.console import info, progress_bar

PART_SUFFIX = ".part.npz"


def output_path(cfg: DictConfig) -> Path:
    return Path(cfg.inference.output or output_root(cfg, "inference") / "inference" / "samples.npz")


def sample_labels(num_samples: int, num_classes: int, seed: int, class_balanced: bool) -> torch.Tensor:
    """Label of every image: uniform i.i.d. from a seeded generator, or each class equally often (shuffled)."""
    generator = torch.Generator().manual_seed(seed)
    if class_balanced:
        labels = torch.arange(num_samples) % num_classes
        return labels[torch.randperm(num_samples, generator=generator)]
    return torch.randint(num_classes, (num_samples,), generator=generator)


def finished_parts(parts_dir: Path) -> dict[Path, np.ndarray]:
    """Indices held by every finished part file (unfinished ones were never renamed into place)."""
    found = {}
    for path in sorted(parts_dir.glob(f"*{PART_SUFFIX}")):
        with np.load(path) as part:
            found[path] = part["indices"]
    return found


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


def run(cfg: DictConfig, feature_extractor=None) -> Path:
    """Generate the .npz (and evaluate it when inference.evaluate, with `feature_extractor` if given)."""
    ic = cfg.inference
    out = output_path(cfg)
    extractor = feature_extractor
    if ic.evaluate and extractor is None:
        extractor = evaluation_extractor(cfg)  # fail before hours of sampling
    if out.exists():
        info(f"{out} already exists (delete it to regenerate)")
    else:
        with RunLock.for_file(out, "inference.output"):  # one run per output file
            _generate(cfg, out)
    dist.barrier()
    if ic.evaluate:
        from phases import evaluate

        if cfg.evaluate.samples is None:
            cfg = cfg.copy()
            cfg.evaluate.samples = str(out)
        evaluate.run(cfg, feature_extractor=extractor)
    elif dist.is_main():
        print(out, flush=True)
    return out


def evaluation_extractor(cfg: DictConfig):
    """Check the evaluation inputs and load the feature network on rank 0, before any sampling."""
    from phases import evaluate

    if not cfg.evaluate.reference or not Path(cfg.evaluate.reference).is_file():
        raise FileNotFoundError(
            f"inference.evaluate=true but evaluate.reference={cfg.evaluate.reference!r} is not a file: "
            f"{evaluate.REFERENCE_HELP}"
        )
    if not dist.is_main():
        return None
    return evaluate.build_inception(cfg.evaluate.inception_weights, dist.device())


def _generate(cfg: DictConfig, out: Path) -> None:
    ic = cfg.inference
    settings = sampler_settings(cfg, "inference")
    ckpt = resolve_checkpoint(cfg.ckpt, cfg.experiment_dir, settings.sampler, settings.steps)
    generator = load_generator(cfg, ckpt, settings, cfg.sample.use_ema, dist.device())
    if dist.is_main():
        record_config(cfg, "inference")
    labels = sample_labels(ic.num_samples, generator.model_args["num_classes"], cfg.seed, ic.class_balanced)
    parts_dir = out.with_name(out.name + ".parts")
    identity = {
        "num_samples": ic.num_samples,
        "seed": cfg.seed,
        "class_balanced": ic.class_balanced,
        "checkpoint": str(Path(ckpt).resolve()),
        "sampler": OmegaConf.to_container(settings),
        "use_ema": cfg.sample.use_ema,
    }
    if dist.is_main():
        check_run_identity(parts_dir, identity, "images", "delete it or choose another inference.output")
        remove_stale_temporaries(parts_dir)  # half-written parts of a killed run (we hold the lock)
        done = set(np.concatenate(list(finished_parts(parts_dir).values()) or [np.zeros(0, np.int64)]).tolist())
    else:
        done = None
    done = dist.broadcast_object(done)
    todo = [i for i in range(ic.num_samples) if i not in done]
    batches = [todo[i : i + ic.batch_size] for i in range(0, len(todo), ic.batch_size)]
    mine = batches[dist.rank() :: dist.world_size()]
    if done:
        info(f"resuming: {len(done)} of {ic.num_samples} images already generated")
    png_dir = out.with_name(out.stem + "_png")
    if ic.save_png:
        png_dir.mkdir(parents=True, exist_ok=True)
    bar = progress_bar(ic.num_samples, len(done), "inference", True)
    with StopSignals() as signals:
        for batch in mine:
            images = generator.images(labels[batch], [cfg.seed + i for i in batch]).numpy()
            _save_part(parts_dir, batch, images, labels[batch].numpy())
            if ic.save_png:
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
        _assemble(parts_dir, out, ic.num_samples, generator)


def _assemble(parts_dir: Path, out: Path, num_samples: int, generator) -> None:
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
