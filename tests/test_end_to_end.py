"""End to end on the bundled demo: extract, train under torchrun (2 CPU processes, gloo),
SIGKILL midway, resume, and compare with an uninterrupted run; then sample a grid."""
import subprocess
import sys
import time
from pathlib import Path

import launch
import pytest
import torch
from PIL import Image

from launch import env, kill_tree
from runtime.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/demo/digits.yaml")
STEPS = 24
TRAIN = ["train.batch_size=16", "train.ckpt_every=4", "train.log_every=4", "train.progress=false",
         f"train.max_steps={STEPS}", "train.warmup_steps=2", "data.holdout=32", "train.eval_every=12"]


def main_py(*args, timeout=300):
    return launch.main_py(CONFIG, *args, timeout=timeout)


def torchrun(*args):
    return launch.torchrun(CONFIG, *args)


def test_killed_torchrun_training_resumes_to_the_same_result(digits_cache, tmp_path):
    common = [f"data.cache_path={digits_cache}", *TRAIN]
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = subprocess.run(torchrun("-p", "train", f"experiment_dir={full_dir}", *common), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr

    victim = subprocess.Popen(torchrun("-p", "train", f"experiment_dir={killed_dir}", *common), cwd=ROOT, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while latest_checkpoint(killed_dir) is None and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(victim)
    killed_at = latest_checkpoint(killed_dir)
    assert killed_at is not None and killed_at.name != f"{STEPS:07d}.pt", "the run was not interrupted midway"

    resumed = subprocess.run(torchrun("-p", "train", f"experiment_dir={killed_dir}", *common), cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    step = int(killed_at.stem)
    assert f"resumed from step {step}" in resumed.stdout

    a = load_checkpoint(full_dir / "checkpoints" / f"{STEPS:07d}.pt")
    b = load_checkpoint(killed_dir / "checkpoints" / f"{STEPS:07d}.pt")
    assert a["step"] == b["step"] == STEPS
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizers"]["model"]["state"].values(), b["optimizers"]["model"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the logged loss curve continues exactly: the last logged losses agree
    last = lambda d: [l for l in (d / "logs/train.jsonl").read_text().splitlines() if '"loss"' in l][-1]
    assert last(full_dir).split('"time"')[0] == last(killed_dir).split('"time"')[0]
    assert (full_dir / "config.train.yaml").is_file()
    assert '"val_mse"' in (full_dir / "logs/train.jsonl").read_text()


def test_train_then_sample_grid(digits_cache, tmp_path):
    exp = tmp_path / "run"
    trained = main_py("-p", "train", f"experiment_dir={exp}", f"data.cache_path={digits_cache}", *TRAIN, "train.max_steps=4")
    assert f"saved checkpoint {exp / 'checkpoints' / '0000004.pt'}" in trained.stdout
    main_py("-p", "sample", f"experiment_dir={exp}", f"data.cache_path={digits_cache}",
            "sample.steps=5", "sample.classes=[1,7]", "sample.per_class=3")
    assert {p.name for p in exp.glob("config.*.yaml")} == {"config.train.yaml", "config.sample.yaml"}
    grid = Image.open(exp / "samples" / "grid.png")
    assert grid.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)
    singles = sorted((exp / "samples").glob("*_class*.png"))
    assert [p.name for p in singles][:1] == ["0000_class1.png"] and len(singles) == 6
    assert Image.open(singles[0]).size == (16, 16)


def test_sample_without_checkpoint_is_an_error(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "-c", CONFIG, "-p", "sample", f"experiment_dir={tmp_path}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "no checkpoint" in proc.stderr
    assert not (tmp_path / "samples").exists()


def test_resume_with_another_model_is_an_error(digits_cache, tmp_path):
    exp = tmp_path / "run"
    main_py("-p", "train", f"experiment_dir={exp}", f"data.cache_path={digits_cache}", *TRAIN, "train.max_steps=4")
    proc = subprocess.run([sys.executable, "main.py", "-c", CONFIG, "-p", "train", f"experiment_dir={exp}",
                           f"data.cache_path={digits_cache}", *TRAIN, "model.name=DiT-T/2"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "different model" in proc.stderr


def test_cache_for_another_image_size_is_an_error(digits_cache, tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "-c", CONFIG, "-p", "train", f"experiment_dir={tmp_path}",
                           f"data.cache_path={digits_cache}", "data.image_size=32"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "image size 16" in proc.stderr


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(digits_cache, tmp_path):
    exp = tmp_path / "run"
    main_py("-p", "train", f"experiment_dir={exp}", f"data.cache_path={digits_cache}", *TRAIN, "train.max_steps=4")
    good = exp / "checkpoints" / "0000004.pt"
    before = good.read_bytes()
    proc = subprocess.run([sys.executable, "main.py", "-c", CONFIG, "-p", "train", f"experiment_dir={exp}",
                           f"data.cache_path={digits_cache}", *TRAIN, "train.max_steps=12", "train.lr=1e30",
                           "train.warmup_steps=0", "train.max_grad_norm=0"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "non-finite loss" in proc.stderr
    assert latest_checkpoint(exp) == good and good.read_bytes() == before
