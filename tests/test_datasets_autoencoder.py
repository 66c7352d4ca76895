"""Autoencoders: a tiny random diffusers AutoencoderKL saved to disk, and the identity."""
import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub.errors import LocalEntryNotFoundError

from datasets import autoencoder as ae_module
from datasets.autoencoder import load_autoencoder


def make_tiny_vae(folder, scaling_factor=0.18215, seed=0):
    """A randomly initialised 2-level AutoencoderKL (downsampling 2, 4 latent channels), saved."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(folder)
    return vae


def test_vae_from_a_local_folder(tmp_path):
    vae = make_tiny_vae(tmp_path / "vae", scaling_factor=0.5).eval()
    ae = load_autoencoder(str(tmp_path / "vae"), "cpu")
    assert ae.scale_factor == 0.5 and ae.latent_channels == 4 and ae.downsample == 2 and ae.in_channels == 3
    assert ae.precision == "fp32"
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = ae.encode(x)
    with torch.no_grad():
        moments = vae.encoder(x)
        moments = vae.quant_conv(moments)
    expected_mean, logvar = moments.chunk(2, dim=1)  # diffusers' DiagonalGaussianDistribution
    assert mean.shape == std.shape == (2, 4, 8, 8)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(std, torch.exp(0.5 * logvar.clamp(-30, 20)))
    images = ae.decode(mean)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert load_autoencoder(str(tmp_path / "vae"), "cpu", scale_factor=0.25).scale_factor == 0.25


def test_pipeline_folder_with_a_vae_subfolder(tmp_path):
    make_tiny_vae(tmp_path / "pipe" / "vae")
    assert load_autoencoder(str(tmp_path / "pipe"), "cpu").latent_channels == 4


def test_identity():
    ae = load_autoencoder("identity", "cpu")
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    mean, std = ae.encode(x)
    assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
    assert ae.scale_factor == 1.0 and ae.downsample == 1 and ae.name == "identity"
    assert torch.equal(ae.decode(torch.tensor([2.0, -3.0, 0.5])), torch.tensor([1.0, -1.0, 0.5]))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_autoencoder(str(tmp_path / "no" / "such" / "vae"), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_autoencoder(str(tmp_path / "empty"), "cpu")


def test_offline_hub_id_says_how_to_get_the_weights(monkeypatch):
    calls = []

    def offline(name, subfolder=None, local_files_only=False):
        calls.append((subfolder, local_files_only))
        try:
            raise LocalEntryNotFoundError("connection error and not in cache")
        except LocalEntryNotFoundError as cause:
            raise OSError(f"{name} does not appear to have a file named config.json.") from cause

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", staticmethod(offline))
    monkeypatch.setattr(ae_module, "_hub_reachable", lambda timeout=3.0: True)  # the hub answers, the file fails
    with pytest.raises(FileNotFoundError, match="save_pretrained.*autoencoder.name=vae/sd-vae-ft-ema"):
        load_autoencoder("stabilityai/sd-vae-ft-ema", "cpu")
    # cache first (root, then vae/), then one download attempt: no second wait for vae/ offline
    assert calls == [(None, True), ("vae", True), (None, False)]
    assert ae_module._is_offline_error(OSError("x")) is False
    # no route to the hub: no download attempt at all (the downloader would retry for half a minute)
    calls.clear()
    monkeypatch.setattr(ae_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ae_module.AutoencoderUnavailable, match="could not load autoencoder"):
        load_autoencoder("stabilityai/sd-vae-ft-ema", "cpu")
    assert calls == [(None, True), ("vae", True)]
