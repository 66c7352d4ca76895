"""Sampling a flow checkpoint: one time convention inside and both outside (a network trained in SiT's time
samples the same images as the same network in REPA's), every sampler batch-independent with guidance, the
guidance interval (one conditional forward outside it), and the settings a flow checkpoint refuses."""
from dataclasses import asdict

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffusion.guidance import guided_model_fn
from methods import sampling
from methods.flow import FlowProcess
from models import create_model
from runtime.config import Config

MARGS = {"name": "DiT-T/4", "input_size": 8, "in_channels": 1, "num_classes": 3, "learn_sigma": True,
         "class_dropout_prob": 0.1}


def random_dit():
    torch.manual_seed(0)
    model = create_model(**MARGS).eval()
    for p in model.parameters():  # away from the adaLN-Zero start: the output depends on (x, t, y)
        nn.init.normal_(p, std=0.02)
    return model


class SiTTimed(nn.Module):
    """The same network as it would be had it been trained in SiT's time: it sees tau = 1 - t and predicts the
    velocity toward the data (the negative of ours)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, tau, y):
        return -self.inner(x, 1.0 - tau, y)


def settings(**overrides):
    base = {"sampler": "ode", "steps": 6, "cfg_scale": 2.0, "eta": 0.0, "cfg_all_channels": None,
            "cfg_interval": None, "time_shift": 1.0}
    return OmegaConf.create({**base, **overrides})


def sample(model, convention="repa", rows=range(3), cfg_overrides=(), **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(list(cfg_overrides)))
    meta = {"method": "flow", "flow": asdict(FlowProcess(convention=convention))}
    fn = sampling.generation_sampler(cfg, model, MARGS, meta, settings(**overrides))
    generators = [torch.Generator().manual_seed(100 + i) for i in rows]
    noise = torch.stack([torch.randn(1, 8, 8, generator=g) for g in generators])
    with torch.no_grad():
        return fn(noise, torch.tensor([i % 3 for i in rows]), generators, False)


@pytest.mark.parametrize("case", [
    dict(),
    dict(sampler="sde", steps=8, cfg_interval=[0.0, 0.7]),
    dict(cfg_overrides=["flow.ode_solver=heun"], time_shift=3.0, cfg_all_channels=False),
])
def test_a_network_in_sits_time_samples_the_same_images_as_in_repas(case):
    case = dict(case)
    cfg_overrides = case.pop("cfg_overrides", ())
    model = random_dit()
    ours = sample(model, "repa", cfg_overrides=cfg_overrides, **case)
    theirs = sample(SiTTimed(model), "sit", cfg_overrides=cfg_overrides, **case)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-5)
    # and the mapping matters: the SiT-timed network read in REPA's time gives other images
    assert not torch.allclose(sample(SiTTimed(model), "repa", cfg_overrides=cfg_overrides, **case), ours, atol=1e-3)


@pytest.mark.parametrize("case", [
    dict(sampler="ode"),
    dict(sampler="sde", steps=5),
    dict(sampler="sde", steps=5, cfg_overrides=["flow.sde_solver=heun", "flow.diffusion_form=sbdm"]),
    dict(sampler="ode", cfg_interval=[0.2, 0.6], cfg_overrides=["flow.ode_solver=adaptive", "flow.ode_rtol=1e-2",
                                                                 "flow.ode_atol=1e-3"]),
])
def test_each_image_comes_from_its_own_generator(case):
    case = dict(case)
    cfg_overrides = case.pop("cfg_overrides", ())
    model = random_dit()
    batch = sample(model, cfg_overrides=cfg_overrides, **case)
    assert batch.shape == (3, 1, 8, 8) and torch.isfinite(batch).all()
    alone = sample(model, rows=[2], cfg_overrides=cfg_overrides, **case)
    torch.testing.assert_close(alone[0], batch[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_guidance_interval_runs_one_conditional_forward_outside_it():
    net = random_dit()
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return net(x, t, y)

    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    guided = guided_model_fn(model, y, 3.0, 3, all_channels=True, interval=(0.2, 0.6), time_of=lambda t: t)
    everywhere = guided_model_fn(net, y, 3.0, 3, all_channels=True)
    with torch.no_grad():
        outside = guided(x, torch.full((3,), 0.8))
        assert calls == [3]  # one forward of the 3 rows, no unconditional copy
        torch.testing.assert_close(outside, net(x, torch.full((3,), 0.8), y))
        inside = guided(x, torch.full((3,), 0.4))
        assert calls[-1] == 6
        torch.testing.assert_close(inside, everywhere(x, torch.full((3,), 0.4)))
        mixed_t = torch.tensor([0.1, 0.4, 0.9])
        mixed = guided(x, mixed_t)
        assert calls[-1] == 4  # rows at different times (adaptive solvers): only row 1 gets its null copy
    torch.testing.assert_close(mixed[1], inside[1])
    torch.testing.assert_close(mixed[[0, 2]], net(x[[0, 2]], mixed_t[[0, 2]], y[[0, 2]]))


def test_the_interval_counts_in_each_methods_time():
    """Diffusion: step k is time (k + 1) / T, so [0, 0.5] guides steps 0..499 only."""
    from methods.diffusion import method_time

    net = random_dit()
    seen = []
    model = lambda x, t, y: seen.append(len(x)) or net(x, t, y)
    guided = guided_model_fn(model, torch.tensor([1]), 2.0, 3, interval=(0.0, 0.5), time_of=method_time(1000))
    with torch.no_grad():
        guided(torch.randn(1, 1, 8, 8), torch.tensor([499]))
        guided(torch.randn(1, 1, 8, 8), torch.tensor([500]))
    assert seen == [2, 1]


@pytest.mark.parametrize("override,message", [
    (dict(sampler="ddim"), "flow-matching model .*it samples with ode, sde.*not 'ddim'"),
    (dict(eta=0.5), "cannot honour eta=0.5"),
    (dict(steps=1, sampler="sde"), "sde needs steps >= 2"),
])
def test_settings_a_flow_checkpoint_cannot_honour(override, message):
    with pytest.raises(ValueError, match=message):
        sample(random_dit(), **override)


def test_a_shift_of_an_adaptive_grid_is_refused():
    with pytest.raises(ValueError, match="time_shift=2.0 shifts a fixed time grid"):
        sample(random_dit(), time_shift=2.0, cfg_overrides=["flow.ode_solver=adaptive"])


def test_methods_without_an_interval_or_a_shift_refuse_them():
    cfg = OmegaConf.structured(Config)
    meta = {"method": "ddgan", "ddgan": {"num_steps": 2, "beta_min": 0.1, "beta_max": 20.0, "eps": 1e-3, "z_dim": 4,
                                         "discriminator": "D-T/4"}}
    with pytest.raises(ValueError, match="cannot limit guidance to an interval"):
        sampling.generation_sampler(cfg, None, MARGS, meta, settings(sampler="ddgan", steps=0, cfg_scale=1.0,
                                                                     cfg_interval=[0.0, 0.5]))
    with pytest.raises(ValueError, match="time_shift=2.0 shifts a flow sampler"):
        sampling.generation_sampler(cfg, None, MARGS, {}, settings(sampler="ddim", time_shift=2.0))
