"""Where a run reports: console lines (rank 0), a JSON-lines metrics file, and wandb when enabled.

wandb is imported only when `wandb.mode` is not "disabled", so machines without it can run.
"""
from __future__ import annotations

import json
import re
import sys
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig

from runtime import distributed as dist
from runtime.atomic_file import write_text_atomic
from runtime.config import to_container


def info(message: str) -> None:
    """Print on rank 0 only (every rank prints errors itself)."""
    if dist.is_main():
        print(message, flush=True)


class MetricsLog:
    """Appends `{"step": ..., **metrics}` lines to `<experiment_dir>/logs/<phase>.jsonl` and to wandb.

    One history per run: a resumed run first drops the records logged after its checkpoint
    (truncate_after), and wandb continues the same run, whose id is kept in logs/wandb_<phase>.id.
    """

    def __init__(self, cfg: DictConfig, phase: str):
        self.enabled = dist.is_main()
        self.path = Path(cfg.experiment_dir) / "logs" / f"{phase}.jsonl"
        self.wandb_run = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.mode != "disabled":
            import wandb  # lazy: optional on GPU boxes

            self.wandb_run = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.wandb.name,
                mode=cfg.wandb.mode,
                dir=str(Path(cfg.experiment_dir)),
                config=to_container(cfg),
                job_type=phase,
                id=wandb_run_id(self.path.parent, phase),
                resume="allow",
            )

    def log_image(self, step: int, key: str, path: Path) -> None:
        """A picture already written to `path`, shown in wandb under `key` (the file is the record)."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def truncate_after(self, step: int) -> int:
        """Drop the records after `step` (and a line torn by a kill), atomically; returns how many went."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return dropped

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def wandb_run_id(folder: Path, phase: str) -> str:
    """The wandb run id of this run folder and phase: made once, then read back on every resume."""
    path = Path(folder) / f"wandb_{phase}.id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    write_text_atomic(path, run_id + "\n")
    return run_id


def format_metrics(step: int, metrics: dict) -> str:
    """One console line: `step 100 | loss 0.1234 | grad_norm 1.20 | lr 1.0e-04 | img/s 512.3`.

    Per-timestep-bucket values (`..._tLLL-HHH`) go to the logs and wandb only: they would drown the line.
    """
    parts = [f"step {step}"]
    for key, value in metrics.items():
        if re.search(r"_t\d{3}-\d{3}$", key):
            continue
        if isinstance(value, float):
            text = f"{value:.2e}" if key == "lr" or (value != 0 and abs(value) < 1e-3) else f"{value:.4f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on rank 0 writing to stderr; a no-op object elsewhere."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (enabled and dist.is_main()),
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=0.1 if sys.stderr.isatty() else 30.0,  # logs to files stay readable
    )
