"""Respaced timestep sets (exactly the reference's) and the spaced process."""
import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, SpacedDiffusion, create_diffusion
from diffusion.respace import space_timesteps


def test_250_steps():
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250
    assert steps[:5] == [0, 4, 8, 12, 16] and steps[-3:] == [991, 995, 999]
    assert steps == [round(k * 999 / 249) for k in range(250)]


def test_ddim_and_plain_grids_differ():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    plain = sorted(space_timesteps(1000, "50"))
    assert len(plain) == 50 and plain[:4] == [0, 20, 41, 61] and plain[-2:] == [979, 999]
    assert space_timesteps(1000, "1000") == set(range(1000)) == space_timesteps(1000, 1000)


def test_sections():
    steps = sorted(space_timesteps(1000, "10,10,10"))
    assert len(steps) == 30
    # sections of 334, 333, 333 steps, each spanned end to end
    assert steps[0] == 0 and steps[9] == 333
    assert steps[10] == 334 and steps[19] == 666
    assert steps[20] == 667 and steps[29] == 999
    assert sorted(space_timesteps(1000, [1, 2])) == [0, 500, 999]


@pytest.mark.parametrize("bad", ["ddim300", "ddimX", "abc", "2000", "400,400,400", "0"])
def test_bad_respacing(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


def test_spaced_process_keeps_alphas_cumprod_and_maps_timesteps():
    base = create_diffusion()
    spaced = create_diffusion(respacing="250")
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 250
    kept = np.array(sorted(space_timesteps(1000, "250")))
    assert np.array_equal(spaced.timestep_map, kept)
    assert np.allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    # beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}]
    assert spaced.betas[0] == pytest.approx(base.betas[0])
    assert spaced.betas[1] == pytest.approx(1 - base.alphas_cumprod[4] / base.alphas_cumprod[0], rel=1e-12)
    t = torch.tensor([0, 1, 249])
    assert torch.equal(spaced.model_timesteps(t), torch.tensor([0, 4, 999]))
    assert spaced.original_num_steps == 1000


def test_full_respacing_is_the_original_process():
    base = create_diffusion()
    full = create_diffusion(respacing="1000")
    assert np.allclose(full.betas, base.betas, rtol=1e-10, atol=0)
    assert type(create_diffusion(respacing="")) is GaussianDiffusion


def test_model_receives_original_timesteps():
    spaced = create_diffusion(respacing="ddim10", learn_sigma=False)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    spaced.ddim_sample_loop(model, torch.randn(2, 1, 2, 2))
    assert [int(t[0]) for t in seen] == list(range(900, -1, -100))
    assert all(t.dtype == torch.long and t.shape == (2,) for t in seen)
