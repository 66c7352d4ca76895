"""build_timestep_strategy: tables vs formulas, drawn samples vs probabilities(), weights, errors."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import chisquare

from diffusion.timesteps import TimestepBatch, build_timestep_strategy, dual, samplers, weightings
from methods.registry import TimestepsConfig

T = 1000


def linear_diffusion(num_timesteps=T):
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
    return SimpleNamespace(num_timesteps=num_timesteps, betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def cosine_diffusion(num_timesteps=T):
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in range(num_timesteps)])
    return SimpleNamespace(num_timesteps=num_timesteps, betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def config(**overrides):
    return OmegaConf.merge(OmegaConf.structured(TimestepsConfig), overrides)


def build(diffusion=None, **overrides):
    return build_timestep_strategy(config(**overrides), diffusion or linear_diffusion(), "cpu")


# --- tables ------------------------------------------------------------------------------


def test_default_is_uniform_unweighted():
    strategy = build()
    assert np.allclose(strategy.probabilities(), 1 / T)
    assert np.array_equal(strategy.weights(), np.ones(T))


def test_speed_tau_auto_and_dual_pivot():
    abar = linear_diffusion().alphas_cumprod
    no_dual = build(sampler="speed", dual=False)
    assert np.allclose(no_dual.probabilities(), samplers.speed_probabilities(T, 642, 5.0))
    p = build(sampler="speed", tau=700).probabilities()
    assert np.allclose(p, dual.dual_marginal(samplers.speed_probabilities(T, 700, 5.0), 642))
    assert round(p[:700].sum(), 2) == 0.96 and p[643:700].sum() * 2 == pytest.approx(57 * 5 / 3800)
    assert round(build(sampler="speed", tau=700, dual=False).probabilities()[:700].sum(), 3) == 0.921
    cosine = build(cosine_diffusion(), sampler="speed", dual=False)
    assert np.allclose(cosine.probabilities(), samplers.speed_probabilities(T, 959, 5.0))
    legacy = build(sampler="speed_legacy", dual=False)
    assert np.allclose(legacy.probabilities(), samplers.speed_legacy_probabilities(abar))
    assert round(legacy.probabilities()[:642].sum(), 2) == 0.90


def test_probabilities_with_batch_size_are_exact_for_that_n():
    strategy = build(sampler="speed", tau=700)
    p = samplers.speed_probabilities(T, 700, 5.0)
    assert np.allclose(strategy.probabilities(batch_size=6), dual.dual_marginal(p, 642, 6))
    assert np.allclose(strategy.probabilities(batch_size=1), p)


@pytest.mark.parametrize(
    "sampler,expected",
    [
        ("lognormal", lambda abar: samplers.lognormal_probabilities(abar, -1.2, 1.2)),
        ("logitnormal", lambda abar: samplers.logitnormal_probabilities(abar, -1.2, 1.2)),
        ("logitnormal_index", lambda abar: samplers.logitnormal_index_probabilities(T, -1.2, 1.2)),
    ],
)
def test_gaussian_samplers_use_mean_and_std(sampler, expected):
    strategy = build(sampler=sampler, mean=-1.2, std=1.2, dual=True)  # dual applies to SpeeD only
    assert np.allclose(strategy.probabilities(), expected(linear_diffusion().alphas_cumprod))


def test_edm_lognormal_mode_and_mean_through_builder():
    p = build(sampler="lognormal", mean=-1.2, std=1.2, weighting="edm").probabilities()
    assert int(np.argmax(p)) == 16 and round(float(p @ np.arange(T))) == 133
    p = build(sampler="logitnormal").probabilities()  # SD3 defaults mean 0, std 1
    assert int(np.argmax(p)) == 142 and round(float(p @ np.arange(T))) == 279


def test_weightings_through_builder():
    abar = linear_diffusion().alphas_cumprod
    assert np.allclose(build(weighting="speed").weights(), weightings.speed_weights(abar, 642, 0.6))
    assert np.allclose(build(weighting="speed", tau=700, lam=0.7).weights(), weightings.speed_weights(abar, 700, 0.7))
    assert np.allclose(build(weighting="p2", p2_k=1, p2_gamma=0.5).weights(), weightings.p2_weights(abar, 1, 0.5))
    assert np.allclose(build(weighting="min_snr", gamma=5).weights(), weightings.min_snr_weights(abar, 5))
    assert np.allclose(build(weighting="edm").weights(), weightings.edm_weights(abar))


def test_unnormalised_expectations_match_spec():
    # spec §1.7.1: E[w] with the dual mixture, 0.53 (paper SpeeD) and 0.58 (legacy + P2); 0.72 uniform P2.
    paper = build(sampler="speed", weighting="speed", tau=700, k=5, lam=0.6)
    legacy = build(sampler="speed_legacy", weighting="p2", p2_k=1, p2_gamma=1)
    uniform = build(weighting="p2")
    assert round(float(paper.probabilities() @ paper.weights()), 2) == 0.53
    assert round(float(legacy.probabilities() @ legacy.weights()), 2) == 0.58
    assert round(float(uniform.probabilities() @ uniform.weights()), 2) == 0.72


@pytest.mark.parametrize(
    "overrides",
    [
        dict(sampler="speed", weighting="speed", tau=700),
        dict(sampler="speed_legacy", weighting="p2"),
        dict(sampler="lognormal", weighting="edm", mean=-1.2, std=1.2),
        dict(weighting="min_snr"),
        dict(sampler="loss_second_moment", weighting="p2"),
    ],
)
def test_normalize_gives_unit_expectation(overrides):
    plain = build(**overrides)
    normalized = build(normalize=True, **overrides)
    p = normalized.probabilities()
    assert float(p @ normalized.weights()) == pytest.approx(1.0, rel=1e-12)
    ratio = normalized.weights() / plain.weights()
    assert np.allclose(ratio, ratio[0])


def test_vb_weight_follows_weight_vb():
    batch = build(weighting="p2").sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(batch.vb_weight, torch.ones(64))
    strategy = build(weighting="p2", weight_vb=True, normalize=True)
    batch = strategy.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(batch.vb_weight, batch.mse_weight)


# --- sampling ----------------------------------------------------------------------------


def equal_mass_chisquare(draws: np.ndarray, p: np.ndarray, bins: int = 40) -> float:
    """Chi-square p-value over groups of consecutive t holding about equal probability mass."""
    cuts = np.unique(np.searchsorted(np.cumsum(p), np.arange(1, bins) / bins, side="right"))
    observed = np.add.reduceat(np.bincount(draws, minlength=p.size), np.concatenate([[0], cuts]))
    expected = np.add.reduceat(p, np.concatenate([[0], cuts])) * draws.size
    return chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(sampler="speed", tau=700),
        dict(sampler="speed", dual=False),
        dict(sampler="speed_legacy"),
        dict(sampler="lognormal", mean=-1.2, std=1.2),
        dict(sampler="logitnormal"),
        dict(sampler="logitnormal_index"),
    ],
)
def test_samples_follow_probabilities(overrides):
    strategy = build(**overrides)
    generator = torch.Generator().manual_seed(1234)
    batch_size, batches = 250, 240
    draws = torch.cat([strategy.sample(batch_size, generator).t for _ in range(batches)]).numpy()
    p = strategy.probabilities(batch_size)
    assert equal_mass_chisquare(draws, p) > 1e-3
    assert draws.min() >= 0 and draws.max() < T
    assert np.all(p[np.unique(draws)] > 0)


def test_speed_sample_fraction_below_tau():
    strategy = build(sampler="speed", tau=700, dual=False)
    draws = strategy.sample(200_000, torch.Generator().manual_seed(5)).t
    assert (draws < 700).float().mean().item() == pytest.approx(0.921, abs=0.003)


def test_dual_batch_structure_and_weights():
    strategy = build(sampler="speed", weighting="speed", tau=700)
    batch = strategy.sample(10, torch.Generator().manual_seed(3))
    assert isinstance(batch, TimestepBatch) and batch.t.dtype == torch.long and batch.t.shape == (10,)
    primaries, duals = batch.t[:6], batch.t[6:]
    assert torch.equal(duals, torch.where(primaries[:4] < 642, 642 - primaries[:4], primaries[:4] - 642))
    w = torch.from_numpy(strategy.weights()).float()
    assert torch.equal(batch.mse_weight, w[batch.t]) and batch.mse_weight.dtype == torch.float32


def test_sampling_is_reproducible_and_uniform_matches_dit_reference():
    strategy = build(sampler="speed")
    first = strategy.sample(32, torch.Generator().manual_seed(7)).t
    assert torch.equal(first, strategy.sample(32, torch.Generator().manual_seed(7)).t)
    uniform = build().sample(32, torch.Generator().manual_seed(7)).t
    assert torch.equal(uniform, torch.randint(0, T, (32,), generator=torch.Generator().manual_seed(7)))


def test_sample_builds_no_tensor_from_host_tables(monkeypatch):
    strategy = build(sampler="speed", weighting="speed")

    def forbidden(*args, **kwargs):
        raise AssertionError("sample() converted a host table")

    monkeypatch.setattr(torch, "from_numpy", forbidden)
    monkeypatch.setattr(torch, "as_tensor", forbidden)
    monkeypatch.setattr(torch, "tensor", forbidden)
    batch = strategy.sample(16, torch.Generator().manual_seed(0))
    assert batch.t.shape == (16,)


def test_update_and_state_of_fixed_tables_are_trivial():
    strategy = build(sampler="speed")
    before = strategy.probabilities()
    strategy.update(torch.tensor([1, 2]), torch.tensor([0.5, 0.25]))
    assert np.array_equal(strategy.probabilities(), before)
    assert strategy.state_dict() == {"sampler": "speed"}


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(sampler="speedy"), "sampler"),
        (dict(weighting="p3"), "weighting"),
        (dict(sampler="speed", k=0.0), "k"),
        (dict(sampler="speed", k=-2.0), "k"),
        (dict(sampler="speed", tau=0), "tau"),
        (dict(sampler="speed", tau=1001), "tau"),
        (dict(weighting="speed", tau="never"), "tau"),
        (dict(weighting="speed", lam=5.0), "lam"),
        (dict(weighting="speed", lam=-0.5), "lam"),
        (dict(sampler="lognormal", std=0.0), "std"),
        (dict(sampler="logitnormal_index", std=-1.0), "std"),
        (dict(weighting="p2", p2_k=-1.0), "p2_k"),
        (dict(weighting="min_snr", gamma=0.0), "gamma"),
        (dict(sampler="loss_second_moment", history=0), "history"),
        (dict(sampler="loss_second_moment", uniform_prob=1.5), "uniform_prob"),
    ],
)
def test_invalid_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"diffusion.timesteps.{key}"):
        build(**overrides)


def test_rejects_respaced_or_incomplete_diffusion():
    respaced = linear_diffusion(250)
    respaced.original_num_steps = 1000
    with pytest.raises(ValueError, match="respaced"):
        build(respaced)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        build_timestep_strategy(config(), SimpleNamespace(num_timesteps=T), "cpu")


def test_rejects_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        build().sample(0)
