"""The training methods beyond IDDPM (model.method=ddgan, cld, flow) end to end on the digits demo: training
under torchrun (2 CPU processes) stopped at a checkpoint and continued equals an uninterrupted run,
and sample / inference recognise the method's checkpoints."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import launch
from launch import env
from methods import registry
from phases import inference, sample
from runtime.checkpoint import load_checkpoint
from runtime.config import load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
TRAIN = ["train.batch_size=16", "train.ckpt_every=3", "train.log_every=3", "train.progress=false",
         "train.sample_every=3", "train.warmup_steps=0"]
METHODS = {  # config, its test settings, the modules its checkpoints hold
    "ddgan": (ROOT / "configs/demo/digits_ddgan.yaml", ["ddgan.lazy_reg=2", "ddgan.discriminator=D-T/8"],
              ("model", "discriminator")),
    "cld": (ROOT / "configs/demo/digits_cld.yaml", ["train.sample_steps=3", "sample.steps=4"], ("model",)),
    "flow": (ROOT / "configs/demo/digits_flow.yaml", ["train.sample_steps=3", "sample.steps=4"], ("model",)),
}


# a SIGKILL-and-resume test of its own already proves this (the suite's time is spent once)
RESUMED_ELSEWHERE = {"flow": "flow: tests/test_flow_end_to_end.py kills and resumes a torchrun run exactly"}


@pytest.fixture(scope="module", params=list(METHODS))
def trained(request, digits_cache, tmp_path_factory):
    """One run of STEPS steps, and one stopped at step STEPS/2 then continued, both under torchrun."""
    config, settings, modules = METHODS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    common = [f"data.cache_path={digits_cache}", *TRAIN, *settings]

    def torchrun(exp, steps):
        proc = subprocess.run(launch.torchrun(config, "-p", "train", f"experiment_dir={exp}", f"train.max_steps={steps}",
                                              *common), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    torchrun(root / "full", STEPS)
    if request.param not in RESUMED_ELSEWHERE:
        torchrun(root / "resumed", STEPS // 2)
        second = torchrun(root / "resumed", STEPS)
        assert f"resumed from step {STEPS // 2}" in second.stdout
    return {"name": request.param, "config": config, "root": root, "common": common, "modules": modules}


def test_a_continued_run_equals_an_uninterrupted_one(trained):
    if trained["name"] in RESUMED_ELSEWHERE:
        pytest.skip(RESUMED_ELSEWHERE[trained["name"]])
    a = load_checkpoint(trained["root"] / "full" / "checkpoints" / f"{STEPS:07d}.pt")
    b = load_checkpoint(trained["root"] / "resumed" / "checkpoints" / f"{STEPS:07d}.pt")
    assert a["method"] == b["method"] == trained["name"]
    for key in (*trained["modules"], "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert set(a["optimizers"]) == set(trained["modules"])
    for objective, state in a["optimizers"].items():
        for sa, sb in zip(state["state"].values(), b["optimizers"][objective]["state"].values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    last = lambda d: (d / "logs/train.jsonl").read_text().splitlines()[-1].split('"time"')[0]
    assert last(trained["root"] / "full") == last(trained["root"] / "resumed")
    grids = sorted(p.name for p in (trained["root"] / "full" / "samples" / "train").glob("*.png"))
    assert grids == ["0000003.png", "0000006.png"]


def test_sample_and_inference_from_a_checkpoint_of_the_method(trained):
    exp = trained["root"] / "full"
    overrides = [f"experiment_dir={exp}", *trained["common"], "sample.classes=[1,7]", "sample.per_class=3"]
    grid = sample.run(load_config(trained["config"], overrides))
    assert grid == exp / "samples" / "grid.png" and Image.open(grid).size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)
    npz = [*overrides, "inference.num_samples=7"]
    first = inference.run(load_config(trained["config"], [*npz, "inference.batch_size=3"]))
    second = inference.run(load_config(trained["config"], [*npz, "inference.batch_size=5",
                                                          f"inference.output={exp / 'b.npz'}"]))
    with np.load(first) as a, np.load(second) as b:
        assert a["arr_0"].shape == (7, 16, 16, 1) and a["arr_0"].std() > 0
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


REFUSALS = {
    "ddgan": [("sample.sampler=ddpm", "denoising diffusion GAN: it samples with ddgan"),
              ("sample.steps=8", "steps=8 cannot be honoured"),
              ("sample.cfg_scale=2.0", "classifier-free guidance is not part of a denoising diffusion GAN")],
    "cld": [("sample.sampler=ddim", "critically-damped Langevin diffusion: it samples with sscs"),
            ("sample.steps=1", "sscs needs steps >= 2"),
            ("sample.eta=0.5", "cannot honour eta=0.5")],
    "flow": [("sample.sampler=ddpm", "flow-matching model .*: it samples with ode, sde"),
             ("sample.sampler=sscs", "'sscs' is a sampler of a critically-damped Langevin diffusion"),
             ("sample.eta=0.5", "cannot honour eta=0.5")],
}


def test_settings_the_checkpoint_cannot_honour_are_errors(trained):
    overrides = [f"experiment_dir={trained['root'] / 'full'}", *trained["common"]]
    for override, message in REFUSALS[trained["name"]]:
        with pytest.raises(ValueError, match=message):
            sample.run(load_config(trained["config"], [*overrides, override]))


def test_sampler_grids_script_puts_samplers_side_by_side(trained):
    if trained["name"] != "cld":
        pytest.skip("one method is enough for the script")
    out = trained["root"] / "samplers.png"
    proc = subprocess.run([sys.executable, "scripts/sampler_grids.py", "-c", str(trained["config"]), "--panel", "sscs:3",
                           "--panel", "euler-maruyama:3", "-o", str(out), f"experiment_dir={trained['root'] / 'full'}",
                           *trained["common"], "sample.classes=[1,7]", "sample.per_class=3"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.endswith(" img/s")]
    assert len(lines) == 2 and lines[0].startswith("sscs 3: ") and lines[1].startswith("euler-maruyama 3: ") and "img/s" in lines[1]
    grid = Image.open(out)
    assert grid.width >= 2 * (3 * 16 + 4 * 2) and grid.height > 2 * 16 + 3 * 2


def test_the_validation_loss_is_refused_for_methods_it_does_not_measure(digits_cache, tmp_path):
    from phases import train
    from runtime.config import ConfigError

    for name, (config, settings, _) in METHODS.items():
        if registry.spec(name).validation_loss is not None:
            continue  # it has one (test_flow_end_to_end.py)
        cfg = load_config(config, [f"experiment_dir={tmp_path / name}", f"data.cache_path={digits_cache}", *settings,
                                   "data.holdout=16", "train.eval_every=2"])
        with pytest.raises(ConfigError, match=f"train.eval_every: model.method={name} has no validation loss"):
            train.run(cfg)
        assert not (tmp_path / name / "checkpoints").exists()


def test_progressive_distillation_refuses_a_teacher_of_another_method(trained, tmp_path):
    from phases import distill

    teacher = trained["root"] / "full" / "checkpoints" / f"{STEPS:07d}.pt"
    cfg = load_config(ROOT / "configs/demo/digits_distill.yaml", [f"experiment_dir={tmp_path}", trained["common"][0],
                                                                  f"distill.teacher={teacher}"])
    with pytest.raises(ValueError, match="progressive distillation starts from a diffusion model"):
        distill.run(cfg)
    assert not (tmp_path / "distill").exists()
