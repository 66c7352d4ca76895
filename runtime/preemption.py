"""Stopping cleanly when the cluster says so: SIGTERM, SIGINT or SIGUSR1 (what Slurm and Kubernetes
send before a kill; torchrun forwards them to its workers).

The handler only records the signal. Long jobs poll at their step (or part) boundaries, and all
ranks agree through a small all-reduce on a CPU (gloo) group, so every rank stops after the same
step: the training loop then writes a checkpoint of that step and raises Preempted. The exchange
of step s is started without waiting and read at step s + 1, so it never stalls a step; the cost
is that the ranks stop one step after the signal. The same exchange carries "a time-based
checkpoint is due" (train.ckpt_every_minutes), so that decision is also the same on every rank.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as tdist

from runtime import distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """A run stopped on a signal after saving its progress; re-running the command continues it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class StopSignals:
    """Context manager that catches the stop signals; poll() says, identically on every rank, what to do."""

    def __init__(self, every_minutes: float = 0.0, overlap: bool = True):
        self.every = float(every_minutes) * 60.0
        self.overlap = overlap and dist.world_size() > 1
        self.received: int | None = None
        self.previous: dict = {}
        self.pending = None
        self.last_time = time.monotonic()

    def __enter__(self) -> "StopSignals":
        for signum in SIGNALS:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.pending is not None and exc_type is None:  # after an error another rank may never answer
            self.pending[0].wait()
        self.pending = None

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "none"

    def poll(self) -> tuple[bool, bool]:
        """(stop now, write a time-based checkpoint now), the same on every rank."""
        due = self.every > 0 and time.monotonic() - self.last_time >= self.every
        flags = torch.tensor([self.received or 0, due], dtype=torch.int32)
        if dist.world_size() > 1:
            flags = self._exchange(flags)
        stop, due = bool(flags[0]), bool(flags[1])
        if stop:
            self.received = int(flags[0])  # every rank names the same signal, also one that did not get it
        if due:
            self.last_time = time.monotonic()
        return stop, due

    def _exchange(self, flags: torch.Tensor) -> torch.Tensor:
        group = dist.cpu_group()
        if not self.overlap:
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=group)
            return flags
        agreed = torch.zeros(2, dtype=torch.int32)
        if self.pending is not None:
            work, agreed = self.pending
            work.wait()
        self.pending = (tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=group, async_op=True), flags)
        return agreed
