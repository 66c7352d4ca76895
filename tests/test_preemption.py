"""Stop signals and run locks as a cluster delivers them: SIGTERM to torchrun (2 CPU processes), a second run
on a busy folder, a killed run's lock, and extract/inference stopping at a part boundary."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import launch
import numpy as np
import pytest
import torch

import phases.extract
import phases.generation
from launch import env, kill_tree
from phases import extract, inference, train
from runtime.checkpoint import list_checkpoints, load_checkpoint
from runtime.config import load_config
from runtime.preemption import Preempted
from runtime.run_lock import RunLock, RunLockedError, check_shared_folder

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits.yaml"
STEPS = 80
TRAIN = ["train.batch_size=16", "train.ckpt_every=1000", "train.log_every=2", "train.progress=false",
         f"train.max_steps={STEPS}", "train.keep_last=0"]


def logged_steps(exp):
    path = Path(exp) / "logs" / "train.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_sigterm_under_torchrun_checkpoints_the_step_and_the_rerun_matches(digits_cache, tmp_path):
    common = [f"data.cache_path={digits_cache}", *TRAIN]
    full = subprocess.run(launch.torchrun(CONFIG, "-p", "train", f"experiment_dir={tmp_path / 'full'}", *common),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr

    exp = tmp_path / "stopped"
    victim = subprocess.Popen(launch.torchrun(CONFIG, "-p", "train", f"experiment_dir={exp}", *common), cwd=ROOT,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not logged_steps(exp) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunLockedError, match="is in use by another run"):  # the run holds its folder
        RunLock(exp).__enter__()
    victim.send_signal(signal.SIGTERM)  # to the launcher, as Slurm does; torchrun forwards it to the workers
    _, stderr = victim.communicate(timeout=120)
    assert victim.returncode != 0
    stopped = [int(step) for step in re.findall(r"stopped at step (\d+) on SIGTERM", stderr)]
    assert stopped and 0 < stopped[0] < STEPS, stderr
    assert [s for s, _ in list_checkpoints(exp / "checkpoints")] == [stopped[0]]

    resumed = subprocess.run(launch.torchrun(CONFIG, "-p", "train", f"experiment_dir={exp}", *common),
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped[0]}" in resumed.stdout
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / f"{STEPS:07d}.pt")
    b = load_checkpoint(exp / "checkpoints" / f"{STEPS:07d}.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert logged_steps(exp) == list(range(2, STEPS + 1, 2))  # each step once
    assert [s for s, _ in list_checkpoints(exp / "checkpoints")] == [STEPS]


def test_a_second_run_on_a_busy_folder_fails_at_once_naming_the_holder(digits_cache, tmp_path):
    with RunLock(tmp_path):
        second = subprocess.run([sys.executable, "main.py", "-c", str(CONFIG), "-p", "train", f"experiment_dir={tmp_path}",
                                 f"data.cache_path={digits_cache}", *TRAIN], cwd=ROOT, env=env(), capture_output=True,
                                text=True, timeout=120)
    assert second.returncode == 1
    assert f"experiment_dir {tmp_path} is in use by another run (host" in second.stderr
    assert f"pid {os.getpid()}, started" in second.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_killed_runs_lock_disappears_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.'); from runtime.run_lock import RunLock\n"
        f"lock = RunLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(600)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).__enter__()
    kill_tree(holder)
    with RunLock(tmp_path):  # no stale lock
        pass


def test_a_rank_that_sees_another_folder_fails_clearly(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match="no shared filesystem"):
            check_shared_folder(tmp_path / ".lock", "a token rank 0 never wrote", "experiment_dir")


def test_inference_stops_at_a_part_boundary_and_continues(digits_cache, tmp_path, monkeypatch):
    exp = tmp_path / "run"
    train.run(load_config(CONFIG, [f"experiment_dir={exp}", f"data.cache_path={digits_cache}", "train.max_steps=2",
                                   "train.batch_size=8", "train.progress=false"]))
    cfg = lambda out: load_config(CONFIG, [f"experiment_dir={exp}", f"data.cache_path={digits_cache}", f"inference.output={out}",
                                           "inference.num_samples=9", "inference.batch_size=3", "sample.steps=3"])
    reference = inference.run(cfg(tmp_path / "whole.npz"))
    real = phases.generation.Generator.images

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(phases.generation.Generator, "images", signalled)
    with pytest.raises(Preempted, match="stopped on SIGTERM with the finished parts kept"):
        inference.run(cfg(tmp_path / "stopped.npz"))
    assert len(list((tmp_path / "stopped.npz.parts").glob("*.part.npz"))) == 1
    monkeypatch.setattr(phases.generation.Generator, "images", real)
    with np.load(inference.run(cfg(tmp_path / "stopped.npz"))) as a, np.load(reference) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_extract_stops_at_a_part_boundary_and_continues(digits_cache, tmp_path, monkeypatch):
    cfg = lambda path: load_config(CONFIG, [f"data.cache_path={path}", "extract.batch_size=300", "extract.flush_every=2"])
    real = phases.extract.encode_both_flips

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(phases.extract, "encode_both_flips", signalled)
    with pytest.raises(Preempted, match="stopped on SIGINT") as info:
        extract.run(cfg(tmp_path / "c.h5"))
    assert info.value.exit_code == 130
    assert len(list((tmp_path / "c.h5.parts").glob("part*.h5"))) == 1  # the first part (600 images) is kept
    monkeypatch.setattr(phases.extract, "encode_both_flips", real)
    extract.run(cfg(tmp_path / "c.h5"))
    import h5py
    with h5py.File(tmp_path / "c.h5") as a, h5py.File(digits_cache) as b:
        assert np.array_equal(a["moments"][:], b["moments"][:])


def test_a_filesystem_without_flock_is_named_not_taken_for_a_busy_folder(tmp_path, monkeypatch):
    import errno
    import fcntl

    def unsupported(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with pytest.raises(RunLockedError, match="does not support flock"):
        RunLock(tmp_path).__enter__()
