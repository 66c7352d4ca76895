"""Starting main.py as a user does, for the end-to-end tests: one process, or torchrun with two CPU
processes (one torch thread each, as torchrun sets), killing a whole launched process tree, and the
killed-and-resumed training run the methods' end-to-end tests compare with an uninterrupted one."""
import os
import subprocess
import sys
from pathlib import Path

from scripts.process_tree import kill_tree

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


def killed_and_resumed_training(config, common: list, folder: Path, steps: int) -> tuple[dict, dict, str]:
    """Train under torchrun to `steps` in folder/full; start the same run in folder/killed, SIGKILL it once its
    first checkpoint is written, and run it again. Returns both final checkpoints and the first run's stdout;
    asserts the second was really interrupted midway and resumed."""
    import time

    from runtime.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint

    def run(exp):
        return subprocess.run(torchrun(config, "-p", "train", f"experiment_dir={exp}", *common), cwd=ROOT, env=env(),
                              capture_output=True, text=True, timeout=600)

    full = run(folder / "full")
    assert full.returncode == 0, full.stdout + full.stderr
    victim = subprocess.Popen(torchrun(config, "-p", "train", f"experiment_dir={folder / 'killed'}", *common),
                              cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while latest_checkpoint(folder / "killed") is None and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(victim)
    written = list_checkpoints(checkpoint_dir(folder / "killed"))  # files, or sharded folders
    assert written and written[-1][0] < steps, "the run was not interrupted midway"
    resumed = run(folder / "killed")
    assert resumed.returncode == 0 and f"resumed from step {written[-1][0]}" in resumed.stdout, resumed.stderr
    final = [dict(list_checkpoints(checkpoint_dir(folder / run)))[steps] for run in ("full", "killed")]
    return load_checkpoint(final[0]), load_checkpoint(final[1]), full.stdout


def assert_same_weights(a: dict, b: dict) -> None:
    """The raw and EMA weights of two checkpoints are bit for bit the same."""
    import torch

    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
