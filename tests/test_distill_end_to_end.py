"""`-p distill` end to end on the demo: two stages under torchrun (2 CPU processes), SIGKILL in the
second stage, resume, and the result equals an uninterrupted run; then sample and inference from
the students; and bad inputs stop before any work."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import launch
import numpy as np
import pytest
import torch

from launch import env, kill_tree
from stand_ins import StandInFeatures
from phases import distill, inference, sample, scoring
from phases.distill_report import read_stages
from phases.generation import load_generator
from methods.distill import locate
from runtime.checkpoint import latest_checkpoint, load_checkpoint
from runtime.config import ConfigError, load_config, sampler_settings
from runtime.preemption import Preempted

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/demo/digits_distill.yaml")
ITERS = 12
DISTILL = ["distill.start_steps=8", "distill.end_steps=2", f"distill.iters_per_stage={ITERS}", "distill.first_stage_iters=null", "distill.batch_size=16",
           "distill.ckpt_every=2", "distill.log_every=4", "distill.eval_samples=6", "distill.progress=false",
           "sample.classes=[0,3]", "sample.per_class=2", "sample.batch_size=4"]


def main_py(*args, timeout=300):
    return launch.main_py(CONFIG, *args, timeout=timeout)


def torchrun(*args):
    return launch.torchrun(CONFIG, *args)


@pytest.fixture(scope="module")
def teacher(digits_cache, tmp_path_factory):
    """A demo teacher trained for a few steps (its quality does not matter here) and its cache."""
    base = tmp_path_factory.mktemp("distill")
    common = [f"experiment_dir={base / 'teacher'}", f"data.cache_path={digits_cache}"]
    main_py("-p", "train", *common, "train.max_steps=20", "train.batch_size=32", "train.progress=false",
            "train.ckpt_every=20")
    return {"cache": digits_cache, "ckpt": latest_checkpoint(base / "teacher")}


def overrides(teacher, run_dir, *extra):
    return [f"experiment_dir={run_dir}", f"data.cache_path={teacher['cache']}", f"distill.teacher={teacher['ckpt']}",
            *DISTILL, *extra]


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """An uninterrupted two-stage run and a run killed in its second stage, then resumed."""
    base = tmp_path_factory.mktemp("runs")
    full_dir, killed_dir = base / "full", base / "killed"
    full = subprocess.run(torchrun("-p", "distill", *overrides(teacher, full_dir)), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr

    victim = subprocess.Popen(torchrun("-p", "distill", *overrides(teacher, killed_dir)), cwd=ROOT, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = killed_dir / "distill" / "0002_steps"
    deadline = time.time() + 300
    while latest_checkpoint(second) is None and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(victim)
    killed_at = latest_checkpoint(second)
    assert killed_at is not None and killed_at.name != f"{ITERS:07d}.pt", "the run was not stopped mid-stage"
    resumed = subprocess.run(torchrun("-p", "distill", *overrides(teacher, killed_dir)), cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return {"full": full_dir, "killed": killed_dir, "full_out": full.stdout, "resumed_out": resumed.stdout,
            "killed_at": int(killed_at.stem)}


def test_killed_distillation_resumes_to_the_same_students(distilled):
    out = distilled["resumed_out"]
    assert f"already at step {ITERS} >= {ITERS} steps" in out  # the finished first stage is not redone
    assert f"resumed from step {distilled['killed_at']}" in out
    for stage in ("0004_steps", "0002_steps"):
        a = load_checkpoint(distilled["full"] / "distill" / stage / "checkpoints" / f"{ITERS:07d}.pt")
        b = load_checkpoint(distilled["killed"] / "distill" / stage / "checkpoints" / f"{ITERS:07d}.pt")
        assert a["step"] == b["step"] == ITERS and "ema" not in a  # no student EMA by default, as released
        for name, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][name]), f"{stage}: model.{name} differs after resume"
        state_a, state_b = a["optimizers"]["model"]["state"], b["optimizers"]["model"]["state"]
        for key in state_a:
            assert torch.equal(state_a[key]["exp_avg"], state_b[key]["exp_avg"])
        info = a["distill"]
        assert (info["steps"], info["teacher_steps"], info["parameterization"], info["cfg_scale"]) == (int(stage[:4]), 2 * int(stage[:4]), "v", 2.0)
        assert a["method"] == "distill" and a["model_args"]["guidance_embedding"] is False
    stage = lambda d: json.loads((d / "distill" / "0002_steps" / "stage.json").read_text())
    assert stage(distilled["full"]) == stage(distilled["killed"])


def test_what_a_user_sees_of_a_distillation(distilled):
    run = distilled["full"]
    for stage in ("0004_steps", "0002_steps"):
        record = json.loads((run / "distill" / stage / "stage.json").read_text())
        assert {"mse_vs_teacher", "mse_vs_reference", "ddim_mse_vs_reference"} <= set(record)
        assert all(np.isfinite(record[k]) and record[k] >= 0 for k in record)
        assert (run / "distill" / stage / "grid.png").is_file() and (run / "distill" / stage / "ddim_grid.png").is_file()
    assert (run / "distill" / "steps_vs_quality.png").is_file()
    records = [json.loads(line) for line in (run / "logs" / "distill.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert {r["stage_steps"] for r in losses} == {4, 2}
    steps = [r["step"] for r in losses]
    assert steps == sorted(steps) and steps[-1] == 2 * ITERS  # one rising step axis over the stages
    assert (run / "config.distill.yaml").is_file()
    assert "stage 2: 4 -> 2 steps" in distilled["full_out"]


def test_sample_and_inference_with_the_students(distilled, teacher, tmp_path):
    run = distilled["full"]
    common = [f"experiment_dir={run}", f"data.cache_path={teacher['cache']}", *DISTILL]
    grid = sample.run(load_config(CONFIG, common))  # default: the last finished stage (2 steps)
    assert grid == run / "distill" / "0002_steps" / "samples" / "grid.png" and grid.is_file()
    grid4 = sample.run(load_config(CONFIG, [*common, "sample.steps=4"]))
    assert grid4 == run / "distill" / "0004_steps" / "samples" / "grid.png"

    npz = [*common, "inference.num_samples=7", "sample.steps=4"]
    a = inference.run(load_config(CONFIG, [*npz, "inference.batch_size=3"]))
    assert a == run / "distill" / "0004_steps" / "inference" / "samples.npz"
    proc = subprocess.run(torchrun("-p", "inference", *npz, "inference.batch_size=2", f"inference.output={tmp_path / 'b.npz'}"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(a) as first, np.load(tmp_path / "b.npz") as second:
        assert first["arr_0"].shape == (7, 16, 16, 1)
        assert np.array_equal(first["arr_0"], second["arr_0"]) and np.array_equal(first["arr_1"], second["arr_1"])


def test_students_refuse_settings_they_cannot_honour(distilled, teacher):
    run = distilled["full"]
    student = run / "distill" / "0004_steps" / "checkpoints" / f"{ITERS:07d}.pt"
    common = [f"experiment_dir={run}", f"data.cache_path={teacher['cache']}", f"ckpt={student}", *DISTILL]
    cases = [("sample.sampler=ddim", "distilled student .*it samples with distilled"),
             ("sample.steps=8", "steps=8 cannot be honoured"),
             ("sample.cfg_scale=3.0", "cannot sample at cfg_scale=3.0")]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            sample.run(load_config(CONFIG, [*common, override]))
    with pytest.raises(ValueError, match="'distilled' is a sampler of a distilled student"):
        sample.run(load_config(CONFIG, [f"experiment_dir={run}", f"ckpt={teacher['ckpt']}", *DISTILL]))
    with pytest.raises(FileNotFoundError, match="no 16-step student"):
        sample.run(load_config(CONFIG, [f"experiment_dir={run}", *DISTILL, "sample.steps=16"]))


def test_bad_inputs_stop_before_any_work(teacher, tmp_path):
    def run(*extra):
        return distill.run(load_config(CONFIG, overrides(teacher, tmp_path / "run", *extra)))

    with pytest.raises(FileNotFoundError, match="distill.teacher=.*no such checkpoint"):
        run(f"distill.teacher={tmp_path / 'missing.pt'}")
    with pytest.raises(FileNotFoundError, match="no teacher"):
        distill.run(load_config(CONFIG, [f"experiment_dir={tmp_path / 'empty'}", f"data.cache_path={teacher['cache']}", *DISTILL]))
    with pytest.raises(ValueError, match="different model"):
        run("model.name=DiT-T/2")
    with pytest.raises(ValueError, match="image size 16"):
        run("data.image_size=32")
    student = load_checkpoint(teacher["ckpt"])
    student["method"] = "distill"
    torch.save(student, tmp_path / "student.pt")
    with pytest.raises(ValueError, match="is a distilled student"):
        run(f"distill.teacher={tmp_path / 'student.pt'}")
    for extra, message in (("distill.start_steps=12", "power of two"), ("distill.end_steps=16", "smaller than"),
                           ("distill.cfg_range=[2.0,1.0]", "lo < hi"), ("distill.parameterization=score", "one of v, x, eps")):
        with pytest.raises(ConfigError, match=message):
            run(extra)
    assert not (tmp_path / "run").exists(), "a rejected run must not leave anything behind"


def test_a_published_teacher_and_a_scale_conditioned_student(teacher, tmp_path):
    """distill.teacher may be a bare state dict (the published DiT format); distill.cfg_range gives a student
    that samples at any scale in the range (and refuses others); distill.ema_decay keeps a student EMA."""
    torch.save(load_checkpoint(teacher["ckpt"])["ema"], tmp_path / "published.pt")
    common = [f"experiment_dir={tmp_path / 'run'}", f"data.cache_path={teacher['cache']}",
              f"distill.teacher={tmp_path / 'published.pt'}", *DISTILL, "distill.start_steps=2", "distill.end_steps=1",
              "distill.iters_per_stage=3", "distill.cfg_range=[1.0,3.0]", "distill.cfg_scale=2.0", "distill.ema_decay=0.5"]
    student = load_checkpoint(distill.run(load_config(CONFIG, common)))
    assert student["model_args"]["guidance_embedding"] is True and student["distill"]["cfg_range"] == [1.0, 3.0]
    assert "ema" in student and any(k.startswith("guidance_embedder.") for k in student["ema"])
    latents = {}
    for scale in (1.0, 3.0):
        cfg = load_config(CONFIG, [*common, f"sample.cfg_scale={scale}"])
        generator = load_generator(cfg, locate(cfg.experiment_dir, 0),
                                   sampler_settings(cfg, "sample"), True, torch.device("cpu"))
        latents[scale] = generator.latents(torch.tensor([0, 3]), [0, 1])
    assert not torch.allclose(latents[1.0], latents[3.0]), "the scale must reach the student"
    with pytest.raises(ValueError, match="outside"):
        sample.run(load_config(CONFIG, [*common, "sample.cfg_scale=4.0"]))


def test_fid_of_every_student(teacher, tmp_path, monkeypatch):
    reference = np.random.default_rng(0).integers(0, 255, size=(20, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "reference.npz", reference)
    monkeypatch.setattr(scoring, "feature_network", lambda cfg, device: StandInFeatures())
    run_dir = tmp_path / "run"
    common = [*overrides(teacher, run_dir), "distill.start_steps=4", "distill.end_steps=1", "distill.iters_per_stage=2",
              "distill.fid_samples=6", f"evaluate.reference={tmp_path / 'reference.npz'}", "inference.batch_size=4"]
    distill.run(load_config(CONFIG, common))
    for steps in (2, 1):
        folder = run_dir / "distill" / f"{steps:04d}_steps"
        with np.load(folder / "inference" / "samples.npz") as samples:
            assert samples["arr_0"].shape == (6, 16, 16, 1)
        assert np.isfinite(json.loads((folder / "eval" / "samples.json").read_text())["fid"])
    assert [r["steps"] for r in read_stages(run_dir / "distill", [2, 1]) if "fid" in r] == [2, 1]


def test_a_distillation_does_not_continue_with_other_settings(distilled, teacher, tmp_path):
    run = distilled["full"]
    before = (run / "config.distill.yaml").read_text()
    shutil.copy(teacher["ckpt"], tmp_path / "another_teacher.pt")
    for override, changed in (("distill.parameterization=x", "parameterization: 'v' then, 'x' now"),
                              ("distill.cfg_scale=3.0", "cfg_scale: 2.0 then, 3.0 now"),
                              (f"distill.teacher={tmp_path / 'another_teacher.pt'}", "teacher: ")):
        with pytest.raises(ValueError, match=f"holds a distillation made with other settings.*{changed}"):
            distill.run(load_config(CONFIG, overrides(teacher, run, override)))
    assert (run / "config.distill.yaml").read_text() == before


def test_a_stop_signal_during_distillation_saves_the_step_and_the_rerun_matches(teacher, tmp_path, monkeypatch):
    one_stage = ["distill.start_steps=4", "distill.end_steps=2", "distill.iters_per_stage=6", "distill.ckpt_every=100"]
    full = load_checkpoint(distill.run(load_config(CONFIG, overrides(teacher, tmp_path / "full", *one_stage))))
    real = torch.optim.AdamW.step
    calls = []

    def step_then_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    with pytest.raises(Preempted, match=r"stopped at step 4 on SIGTERM; checkpoint .*0002_steps/checkpoints/0000004.pt"):
        distill.run(load_config(CONFIG, overrides(teacher, tmp_path / "stopped", *one_stage)))
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    resumed = load_checkpoint(distill.run(load_config(CONFIG, overrides(teacher, tmp_path / "stopped", *one_stage))))
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
