"""Generation from a published-format DiT checkpoint (a bare state dict) with every sampler."""
from pathlib import Path

import pytest
import torch

from diffusion.noise import per_row_noise
from diffusion.sampler import SAMPLERS
from models import create_model
from phases.generation import load_generator, to_uint8
from runtime.config import load_config, sampler_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A DiT-T/4 for 16x16 RGB pixels with random (not zero-initialised) weights, saved as DiT releases are."""
    torch.manual_seed(0)
    model = create_model("DiT-T/4", input_size=16, in_channels=3, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("published") / "DiT-T-4-16x16.pt"
    torch.save(model.state_dict(), path)
    return path


def make_cfg(tmp_path, *extra):
    return load_config(ROOT / "configs/demo/digits.yaml",
                       [f"experiment_dir={tmp_path}", f"data.cache_path={tmp_path / 'absent.h5'}",
                        "model.name=DiT-T/4", *extra])


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_gives_finite_images(published, tmp_path, name):
    cfg = make_cfg(tmp_path, f"sample.sampler={name}", "sample.steps=5" if name != "ddim" else "sample.steps=4")
    generator = load_generator(cfg, published, sampler_settings(cfg, "sample"), True, torch.device("cpu"))
    assert generator.latent_shape == (3, 16, 16)
    labels = torch.tensor([1, 2])
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    noise = per_row_noise((2, 3, 16, 16), gens, "cpu")
    latents = generator.sample(noise, labels, gens, False)
    assert latents.shape == noise.shape and torch.isfinite(latents).all()
    assert not torch.equal(latents, noise)
    images = generator.images(labels, [0, 1])
    assert images.shape == (2, 16, 16, 3) and images.dtype == torch.uint8


def test_published_checkpoint_of_another_size_is_a_clear_error(published, tmp_path):
    cfg = make_cfg(tmp_path, "data.image_size=32")
    with pytest.raises(ValueError, match="pos_embed"):
        load_generator(cfg, published, sampler_settings(cfg, "sample"), True, torch.device("cpu"))


def test_uint8_mapping_matches_dit():
    pixels = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).view(1, 1, 1, 5)
    assert to_uint8(pixels).flatten().tolist() == [0, 0, 128, 255, 255]
