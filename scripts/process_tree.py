"""Killing a launched process tree at once, as a crash or a preemption would (tests and scripts/gpu_check.py)."""
from __future__ import annotations

import signal
import subprocess

import psutil


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (torchrun starts its workers in their own process groups, so killing
    the launcher's group is not enough), and wait until all of them are gone."""
    family = [parent := psutil.Process(proc.pid), *parent.children(recursive=True)]
    for member in family:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()
