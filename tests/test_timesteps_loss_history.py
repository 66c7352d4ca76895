"""IDDPM loss-second-moment sampler: warm-up, history, importance weights, ranks, state round trip."""
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion.timesteps import LossAwareStrategy, build_timestep_strategy
from diffusion.timesteps.loss_history import LossHistory
from runtime import distributed
from methods.registry import TimestepsConfig


def linear_diffusion(num_timesteps):
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    return SimpleNamespace(num_timesteps=num_timesteps, betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def build(num_timesteps=6, **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(TimestepsConfig), dict(sampler="loss_second_moment", **overrides))
    return build_timestep_strategy(cfg, linear_diffusion(num_timesteps), "cpu")


def fill(strategy, rounds, loss_of_t):
    """`rounds` updates that each record one loss for every t."""
    t = torch.arange(strategy.num_timesteps)
    for r in range(rounds):
        strategy.update(t, torch.tensor([loss_of_t(int(i), r) for i in t], dtype=torch.float32))


def expected_p(losses: np.ndarray, uniform_prob: float) -> np.ndarray:
    """IDDPM: sqrt(mean of squares) per t, normalised, mixed with uniform."""
    moment = np.sqrt((losses**2).mean(axis=1))
    return (1 - uniform_prob) * moment / moment.sum() + uniform_prob / losses.shape[0]


def test_uniform_with_unit_weights_during_warmup():
    strategy = build(history=3)
    fill(strategy, 2, lambda t, r: t + 1.0)
    strategy.update(torch.arange(5), torch.ones(5))  # t = 5 still has only 2 entries
    assert not strategy.history.warmed_up()
    assert np.allclose(strategy.probabilities(), 1 / 6)
    batch = strategy.sample(32, torch.Generator().manual_seed(0))
    assert torch.allclose(batch.mse_weight, torch.ones(32)) and torch.allclose(batch.vb_weight, torch.ones(32))


def test_probabilities_after_warmup_follow_second_moment():
    strategy = build(history=3, uniform_prob=0.01)
    fill(strategy, 5, lambda t, r: (t + 1.0) * (1 + r))  # the window keeps rounds 2, 3, 4
    assert strategy.history.warmed_up()
    window = np.array([[(t + 1.0) * (1 + r) for r in (2, 3, 4)] for t in range(6)])
    assert np.allclose(strategy.probabilities(), expected_p(window, 0.01))
    assert strategy.history.counts.dtype == torch.int64 and strategy.history.counts.tolist() == [5] * 6


def test_repeated_timesteps_in_one_update_are_recorded_in_order():
    history = LossHistory(3, history=2, uniform_prob=0.5)
    history.add(np.array([0, 0, 0, 1, 1, 2, 2]), np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
    assert sorted(history.losses[0].tolist()) == [2.0, 3.0]  # the oldest (1.0) was overwritten
    assert history.counts.tolist() == [3, 2, 2]
    assert np.allclose(history.probabilities(), expected_p(np.array([[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]), 0.5))


def test_importance_weights_make_the_objective_unbiased():
    strategy = build(history=2, weighting="p2", uniform_prob=0.001)
    fill(strategy, 2, lambda t, r: 0.1 * (t + 1) ** 2 + r)
    p = strategy.probabilities()
    assert not np.allclose(p, 1 / 6)
    p2 = 1 - linear_diffusion(6).alphas_cumprod
    assert np.allclose(strategy.weights(), p2 / (6 * p))
    losses = np.random.default_rng(0).random(6)
    assert float(p @ (strategy.weights() * losses)) == pytest.approx(float(np.mean(p2 * losses)))
    batch = strategy.sample(500, torch.Generator().manual_seed(1))
    t = batch.t.numpy()
    assert np.allclose(batch.mse_weight.numpy(), (p2 / (6 * p))[t], rtol=1e-6)
    assert np.allclose(batch.vb_weight.numpy(), (1 / (6 * p))[t], rtol=1e-6)  # weight_vb False: importance only
    with_vb = build(history=2, weighting="p2", weight_vb=True)
    fill(with_vb, 2, lambda t, r: 0.1 * (t + 1) ** 2 + r)
    batch = with_vb.sample(8, torch.Generator().manual_seed(1))
    assert torch.equal(batch.vb_weight, batch.mse_weight)


def test_samples_follow_current_probabilities():
    strategy = build(num_timesteps=20, history=1)
    fill(strategy, 1, lambda t, r: 1.0 + t)
    draws = strategy.sample(100_000, torch.Generator().manual_seed(2)).t
    frequency = np.bincount(draws.numpy(), minlength=20) / 100_000
    assert np.abs(frequency - strategy.probabilities()).max() < 0.005


def test_update_gathers_losses_from_every_rank(monkeypatch):
    other_rank = {torch.int64: torch.tensor([4, 4]), torch.float64: torch.tensor([9.0, 8.0], dtype=torch.float64)}

    def fake_gather(tensor):
        return torch.cat([tensor, other_rank[tensor.dtype]])

    monkeypatch.setattr(distributed, "all_gather_tensor", fake_gather)
    strategy = build(history=3)
    strategy.update(torch.tensor([1, 4]), torch.tensor([0.5, 7.0]))
    assert strategy.history.counts.tolist() == [0, 1, 0, 0, 3, 0]
    assert strategy.history.losses[4].tolist() == [7.0, 9.0, 8.0]


def test_state_dict_round_trip_is_weights_only_loadable():
    strategy = build(history=2)
    fill(strategy, 3, lambda t, r: 1.0 + t * r)
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = build(history=2)
    restored.load_state_dict(state)
    assert np.array_equal(restored.probabilities(), strategy.probabilities())
    a = strategy.sample(16, torch.Generator().manual_seed(4))
    b = restored.sample(16, torch.Generator().manual_seed(4))
    assert torch.equal(a.t, b.t) and torch.equal(a.mse_weight, b.mse_weight)
    restored.update(torch.tensor([0]), torch.tensor([100.0]))  # restored state is a copy
    assert strategy.history.counts[0] == 3


def test_load_state_dict_errors():
    strategy = build(history=2)
    with pytest.raises(ValueError, match="saved by sampler 'uniform'"):
        strategy.load_state_dict({"sampler": "uniform"})
    other = build(history=3).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        strategy.load_state_dict(other)


def test_bad_updates_are_rejected():
    strategy = build(history=2)
    with pytest.raises(ValueError, match="losses"):
        strategy.update(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        strategy.update(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="timesteps"):
        strategy.update(torch.tensor([6]), torch.tensor([1.0]))


def test_all_zero_losses_fall_back_to_uniform():
    strategy = build(history=1)
    fill(strategy, 1, lambda t, r: 0.0)
    assert isinstance(strategy, LossAwareStrategy) and np.allclose(strategy.probabilities(), 1 / 6)


def _two_rank_worker(rank, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        strategy = build(history=2)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank draws its own timesteps
        for _ in range(3):
            batch = strategy.sample(4, generator)
            strategy.update(batch.t, batch.t.float() * (rank + 1))
        torch.save(strategy.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_keep_identical_history(tmp_path):
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert int(states[0]["counts"].sum()) == 2 * 3 * 4  # both ranks' losses, on every rank
    assert torch.equal(states[0]["counts"], states[1]["counts"])
    assert torch.equal(states[0]["losses"], states[1]["losses"])
