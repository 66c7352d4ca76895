"""Starting main.py as a user does, for the end-to-end tests: one process, or torchrun with two CPU
processes (one torch thread each, as torchrun sets), and killing a whole launched process tree."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def main_py(config, *args, timeout=300) -> subprocess.CompletedProcess:
    """`python main.py -c config ...`, which must succeed."""
    proc = subprocess.run([sys.executable, "main.py", "-c", str(config), *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def torchrun(config, *args) -> list[str]:
    """The command line of `torchrun --standalone --nproc_per_node=2 main.py -c config ...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "main.py", "-c", str(config), *args]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker (torchrun starts its workers in their own groups)."""
    family = [parent := psutil.Process(proc.pid), *parent.children(recursive=True)]
    for member in family:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()
