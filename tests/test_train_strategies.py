"""Every timestep strategy trains the demo; resuming restores the sampler state (loss history)."""
from pathlib import Path

import pytest
import torch

from diffusion.timesteps import SAMPLERS, WEIGHTINGS
from phases import train
from phases.validation import holdout_split
from runtime.checkpoint import load_checkpoint
from runtime.config import load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(digits_cache, exp, *extra):
    return load_config(ROOT / "configs/demo/digits.yaml", [
        f"data.cache_path={digits_cache}", f"experiment_dir={exp}", "train.batch_size=8", "train.progress=false",
        "train.log_every=2", "train.ckpt_every=2", *extra])


STRATEGIES = [("uniform", "none")] + [(s, "none") for s in SAMPLERS if s != "uniform"] + \
             [("uniform", w) for w in WEIGHTINGS if w != "none"] + [("speed", "speed"), ("speed_legacy", "p2")]


@pytest.mark.parametrize("sampler,weighting", STRATEGIES)
def test_each_strategy_trains(digits_cache, tmp_path, sampler, weighting):
    ckpt = train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=2", f"diffusion.timesteps.sampler={sampler}",
                             f"diffusion.timesteps.weighting={weighting}"))
    state = load_checkpoint(ckpt)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_keeps_the_loss_history(digits_cache, tmp_path):
    """loss_second_moment: 4 steps + resume to 6 equals 6 uninterrupted steps, history included."""
    strategy = ["diffusion.timesteps.sampler=loss_second_moment", "diffusion.timesteps.history=2"]
    full = load_checkpoint(train.run(cfg_for(digits_cache, tmp_path / "full", "train.max_steps=6", *strategy)))
    train.run(cfg_for(digits_cache, tmp_path / "split", "train.max_steps=4", *strategy))
    resumed = load_checkpoint(train.run(cfg_for(digits_cache, tmp_path / "split", "train.max_steps=6", *strategy)))
    history = full["method_state"]["timesteps"]
    assert any(torch.is_tensor(v) and v.numel() > 1 and v.abs().sum() > 0 for v in history.values())
    for key, value in history.items():
        other = resumed["method_state"]["timesteps"][key]
        assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_holdout_is_spread_over_the_whole_cache():
    kept, held = holdout_split(100, 10)
    assert held == list(range(0, 100, 10))
    assert sorted(kept + held) == list(range(100)) and not set(kept) & set(held)
    assert holdout_split(5, 0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match="data.holdout"):
        holdout_split(5, 5)
