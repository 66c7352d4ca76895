"""Sampling a CLD checkpoint: every sampler, with guidance, gives each image from its own generator
(batch-independent), and the guided score is DiT's guidance applied to the network output."""
import pytest
import torch
from omegaconf import OmegaConf

from diffusion.cld import CLD
from methods import cld as cld_method
from methods import sampling
from models import create_model
from runtime.config import Config

MARGS = {"name": "DiT-T/4", "input_size": 8, "in_channels": 1, "num_classes": 3, "learn_sigma": False,
         "class_dropout_prob": 0.1, "extra_in_channels": 1}


def _model():
    torch.manual_seed(0)
    model = create_model(**MARGS).eval()
    for p in model.parameters():  # away from the adaLN-Zero start: outputs depend on (x, v, t, y)
        torch.nn.init.normal_(p, std=0.02)
    return model


def _sample(sampler, steps, rows, cfg_scale=2.0, solver="adaptive"):
    cfg = OmegaConf.structured(Config)
    cfg.cld.ode_solver, cfg.cld.ode_rtol, cfg.cld.ode_atol = solver, 1e-3, 1e-3
    cfg.cld.sampling_eps = 0.05  # the ODE is stiff near t = 0: stop early, this is about batch independence
    settings = OmegaConf.create({"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "eta": 0.0,
                                 "cfg_all_channels": False})
    meta = cld_method.metadata(cfg)
    sample = cld_method.generation_sampler(cfg, _model(), MARGS, meta, settings)
    generators = [torch.Generator().manual_seed(100 + i) for i in rows]
    noise = torch.stack([torch.randn(1, 8, 8, generator=g) for g in generators])
    with torch.no_grad():
        return sample(noise, torch.tensor([i % 3 for i in rows]), generators, False)


@pytest.mark.parametrize("sampler,steps,solver", [("sscs", 5, "adaptive"), ("euler-maruyama", 5, "adaptive"),
                                                  ("cld-ode", 0, "adaptive"), ("cld-ode", 4, "rk4")])
def test_each_image_comes_from_its_own_generator(sampler, steps, solver):
    batch = _sample(sampler, steps, range(3), solver=solver)
    assert batch.shape == (3, 1, 8, 8) and torch.isfinite(batch).all()
    for row in (2,):
        alone = _sample(sampler, steps, [row], solver=solver)
        torch.testing.assert_close(alone[0], batch[row], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_guidance_acts_on_the_network_output_with_dits_convention():
    """score = -ell (a_null + s (a_cond - a_null)) - v / Svv for the guided channels."""
    model, process = _model(), CLD()
    x, v = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([0.3, 0.7], dtype=torch.float64), torch.tensor([1, 2])
    captured = {}
    settings = OmegaConf.create({"sampler": "sscs", "steps": 2, "cfg_scale": 3.0, "eta": 0.0, "cfg_all_channels": True})

    def fake_sscs(proc, score, x0, v0, steps, noise, progress=False, striding="linear"):
        captured["score"] = score(x, v, t)
        return x0, v0

    original = cld_method.sscs_sample
    cld_method.sscs_sample = fake_sscs
    try:
        sample = cld_method.generation_sampler(None, model, MARGS, {"cld": cld_method.metadata(
            OmegaConf.structured(Config))["cld"]}, settings)
        sample(torch.randn(2, 1, 8, 8), y, [torch.Generator().manual_seed(i) for i in range(2)], False)
    finally:
        cld_method.sscs_sample = original
    u, tt = torch.cat([x, v], 1), (1000 * t).float()
    with torch.no_grad():
        cond, null = model(u, tt, y), model(u, tt, torch.full_like(y, 3))
    alpha = null + 3.0 * (cond - null)
    torch.testing.assert_close(captured["score"], process.velocity_score(alpha, x, v, t), atol=1e-5, rtol=1e-4)


def test_guidance_without_a_null_class_is_an_error():
    settings = OmegaConf.create({"sampler": "sscs", "steps": 10, "cfg_scale": 1.5, "eta": 0.0, "cfg_all_channels": False})
    with pytest.raises(ValueError, match="no null class"):
        sampling.generation_sampler(OmegaConf.structured(Config), None, {**MARGS, "class_dropout_prob": 0.0},
                                    {"method": "cld", "cld": {}}, settings)
