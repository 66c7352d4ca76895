"""The seam between the training loop and a training method.

The loop (runtime/training_loop.py) owns everything every method shares: data order, DDP,
precision, gradient accumulation and clipping, EMA, checkpoints, exact resume, the NaN stop and
logging. A method owns only what differs: its trainable modules, its objectives (one optimizer
each), the loss of a micro-batch, and any state that must survive a resume. Sampling from a
method's checkpoints is in the same module (see methods/__init__.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class Objective:
    """One optimizer and what it updates; the loop steps objectives in list order, every step.

    `modules` names entries of Method.modules(). `lr_scale` multiplies the scheduled learning rate
    (a GAN's discriminator may learn faster than its generator).
    """

    name: str
    modules: tuple[str, ...]
    lr_scale: float = 1.0


class Method(Protocol):
    """What a training method gives the loop."""

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by name; "model" is the network that is EMA-averaged and sampled."""

    def objectives(self) -> list[Objective]:
        """The optimizers to build and step, in order."""

    def begin_step(self, step: int) -> None:
        """Called before every optimizer step with its 0-based index (lazy regularisers need it)."""

    def loss(
        self, objective: str, nets: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss to minimise, detached scalar metrics to log) for one micro-batch.

        `nets` are the modules as the loop wrapped them (DDP, torch.compile): call those, not
        modules(). `generator` is a CPU generator seeded by (seed, step, micro-batch, rank); the
        global torch RNG is seeded by (seed, step, rank) before every step, so `torch.randn` on
        the device is reproducible too.
        """

    def log_metrics(self) -> dict:
        """Metrics the method accumulated itself since the last log step (called on every rank, may all-reduce)."""

    def state_dict(self) -> dict:
        """Extra state for checkpoints (plain tensors and python values)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""


class NoExtraState:
    """Defaults for a method that keeps nothing of its own between steps (no lazy schedule, no
    accumulated metrics, nothing to checkpoint besides its modules and optimizers)."""

    def begin_step(self, step: int) -> None:
        pass

    def log_metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SingleNetwork(NoExtraState):
    """A method that trains one network, "model", with one optimizer.

    `functional` True: the loss applies torch.func transforms (a JVP) to the network, which cannot run through
    the DDP wrapper, so the loop passes the bare module and averages the gradients over the ranks itself.
    """

    functional = False

    def __init__(self, model: nn.Module):
        self.model = model

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def objectives(self) -> list[Objective]:
        return [Objective("model", ("model",))]
