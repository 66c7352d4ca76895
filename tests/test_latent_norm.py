"""Latent normalisation (scale factor or per-channel statistics) and LDM-format autoencoder files."""
import numpy as np
import pytest
import torch

from datasets.autoencoder import autoencoder_geometry, load_autoencoder
from datasets.latent_norm import ChannelMoments, LatentNorm, norm_from_cache, norm_of_checkpoint, read_stats_file
from datasets.ldm_vae import convert_ldm_vae, ldm_architecture, load_ldm_vae, read_ldm_state
from ldm_files import ldm_vae_state


def test_per_channel_normalisation_and_its_inverse():
    z = torch.randn(4, 3, 5, 5) * torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -3.0, 0.0]).view(1, 3, 1, 1)
    norm = LatentNorm.from_statistics([1.0, -3.0, 0.0], [2.0, 0.5, 1.0], scale_factor=1.0)
    normalized = norm.normalize(z)
    torch.testing.assert_close(normalized, (z - torch.tensor([1.0, -3.0, 0.0]).view(1, 3, 1, 1)) / torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1))
    torch.testing.assert_close(norm.denormalize(normalized), z)
    scalar = LatentNorm.scalar(0.18215)
    assert torch.equal(scalar.normalize(z), z * 0.18215) and not scalar.per_channel and norm.per_channel
    assert LatentNorm.from_dict(norm.as_dict()) == norm
    assert norm_of_checkpoint({"name": "x", "scale_factor": 0.5}) == LatentNorm.scalar(0.5)
    assert norm_of_checkpoint({"name": "x", "scale_factor": 1.0, "normalization": norm.as_dict()}) == norm
    with pytest.raises(ValueError, match="std > 0"):
        LatentNorm.from_statistics([0.0], [0.0])


def test_channel_moments_are_those_of_the_posterior_samples():
    rng = np.random.default_rng(0)
    moments = np.zeros((50, 2, 2, 3, 4, 4))
    moments[:, :, 0] = rng.normal([1.0, -2.0, 0.5], 1.0, size=(50, 2, 4, 4, 3)).transpose(0, 1, 4, 2, 3)
    moments[:, :, 1] = rng.uniform(0.1, 0.6, size=(50, 2, 3, 4, 4))
    stats = ChannelMoments()
    stats.add(moments[:20].astype(np.float16))
    stats.add(moments[20:].astype(np.float16))
    mean, std = stats.result()
    half = moments.astype(np.float16).astype(np.float64)
    samples = half[:, :, 0] + half[:, :, 1] * rng.standard_normal(half[:, :, 0].shape)
    np.testing.assert_allclose(mean, half[:, :, 0].mean(axis=(0, 1, 3, 4)))
    expected_var = (half[:, :, 0] ** 2 + half[:, :, 1] ** 2).mean(axis=(0, 1, 3, 4)) - mean**2
    np.testing.assert_allclose(std, np.sqrt(expected_var))
    np.testing.assert_allclose(std, samples.std(axis=(0, 1, 3, 4)), rtol=0.05)  # what the reader will draw


def test_norm_from_cache_and_stats_files(tmp_path):
    cache = {"scale_factor": 1.0, "latent_mean": [0.5, -1.0], "latent_std": [2.0, 4.0]}
    assert norm_from_cache("scale", cache, "c.h5") == LatentNorm.scalar(1.0)
    norm = norm_from_cache("channel", cache, "c.h5")
    torch.testing.assert_close(norm.normalize(torch.tensor([[0.5, 3.0]]).view(1, 2, 1, 1)).flatten(),
                               torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no per-channel latent statistics"):
        norm_from_cache("channel", {"scale_factor": 1.0, "latent_mean": None}, "old.h5")
    torch.save({"mean": torch.tensor([0.5, -1.0]).view(1, 2, 1, 1), "std": torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)},
               tmp_path / "latents_stats.pt")
    mean, std = read_stats_file(tmp_path / "latents_stats.pt")
    assert mean.tolist() == [0.5, -1.0] and std.tolist() == [2.0, 4.0]


def test_an_ldm_file_loads_into_diffusers_with_its_architecture_read_off_the_keys(tmp_path):
    state = ldm_vae_state(ch=32, mult=(1, 2), blocks=1, z=8, attention_levels=(1,))
    torch.save({"state_dict": state}, tmp_path / "vavae.pt")
    config = ldm_architecture(read_ldm_state(tmp_path / "vavae.pt"))
    assert config["block_out_channels"] == [32, 64] and config["latent_channels"] == 8
    assert config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"] and config["layers_per_block"] == 1
    vae = load_ldm_vae(tmp_path / "vavae.pt")  # strict: every key mapped
    converted = convert_ldm_vae(read_ldm_state(tmp_path / "vavae.pt"), config)
    # the in-level attentions, which diffusers' own converter leaves out, land where diffusers keeps them
    torch.testing.assert_close(vae.encoder.down_blocks[1].attentions[0].to_q.weight,
                               state["encoder.down.1.attn.0.q.weight"][:, :, 0, 0])
    torch.testing.assert_close(vae.decoder.up_blocks[0].attentions[1].to_out[0].weight,
                               state["decoder.up.1.attn.1.proj_out.weight"][:, :, 0, 0])
    assert torch.equal(converted["decoder.up_blocks.1.resnets.0.conv1.weight"], state["decoder.up.0.block.0.conv1.weight"])
    ae = load_autoencoder(str(tmp_path / "vavae.pt"), "cpu")
    assert (ae.latent_channels, ae.downsample) == (8, 2) and autoencoder_geometry(str(tmp_path / "vavae.pt")) == (2, 8)
    mean, std = ae.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert mean.shape == (2, 8, 8, 8) and (std > 0).all()
    assert ae.decode(mean).shape == (2, 3, 16, 16)
    torch.save({"state_dict": {"model.layer.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an LDM-format autoencoder"):
        load_autoencoder(str(tmp_path / "other.pt"), "cpu")
