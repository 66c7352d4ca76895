"""Autoencoders between pixels in [-1, 1] and (unscaled) latents: the SD VAE and the identity.

`encode` returns the Gaussian posterior (mean, std), not a sample, so the cache can store the
distribution and draw a fresh sample every time it is read; the network sees the sample normalised
(datasets/latent_norm.py: times `scale_factor`, 0.18215 for the SD VAE, or per channel), and
`decode_latents` undoes that before decoding.
"""
from __future__ import annotations

import contextlib
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch

from datasets.latent_norm import LatentNorm
from datasets.ldm_vae import load_ldm_vae

IDENTITY = "identity"


class IdentityAutoencoder:
    """Pixel-space diffusion: the latent is the image itself (any channel count), std 0."""

    name = IDENTITY
    latent_channels = None  # same as the input
    in_channels = None  # any
    downsample = 1

    def __init__(self, scale_factor: float | None = None, norm: LatentNorm | None = None):
        self.scale_factor = 1.0 if scale_factor is None else float(scale_factor)
        self.norm = norm if norm is not None else LatentNorm.scalar(self.scale_factor)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        return x, torch.zeros_like(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.float().clamp(-1, 1)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """What the network generated -> pixels in [-1, 1]."""
        return self.decode(self.norm.denormalize(z.float()))


class VAEAutoencoder:
    """A diffusers AutoencoderKL, frozen, in eval mode; bf16 autocast on CUDA when asked."""

    def __init__(self, vae, name: str, device: torch.device, scale_factor: float | None, precision: str,
                 norm: LatentNorm | None = None):
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"autoencoder precision must be bf16 or fp32, got {precision!r}")
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.name = name
        self.device = torch.device(device)
        config = vae.config
        self.scale_factor = float(config.scaling_factor if scale_factor is None else scale_factor)
        self.norm = norm if norm is not None else LatentNorm.scalar(self.scale_factor)
        self.latent_channels = int(config.latent_channels)
        self.in_channels = int(config.in_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        # bf16 only where it is fast and supported; on CPU the encoder always runs in fp32.
        self.precision = "bf16" if precision == "bf16" and self.device.type == "cuda" else "fp32"

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,3,H,W] in [-1,1] -> posterior mean and std [B,C,H/f,W/f], float32."""
        with self._autocast():
            posterior = self.vae.encode(x.to(self.device, torch.float32)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in [-1, 1], float32."""
        with self._autocast():
            images = self.vae.decode(z.to(self.device, torch.float32)).sample
        return images.float().clamp(-1, 1)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """What the network generated -> pixels in [-1, 1]."""
        return self.decode(self.norm.denormalize(z.float()))


def load_autoencoder(name: str, device, scale_factor: float | None = None, precision: str = "fp32",
                     norm: LatentNorm | None = None):
    """"identity", a local folder saved with `save_pretrained`, a local LDM-format file (VA-VAE's release:
    datasets/ldm_vae.py), or a Hugging Face id. `norm` is how the network's latents are normalised (the
    scale factor when None).

    A Hugging Face id may name a VAE repo (config.json at the top) or a pipeline repo whose VAE
    sits in its `vae/` subfolder. The local Hugging Face cache is tried first, so nothing is
    downloaded when the weights are already there.
    """
    if name == IDENTITY:
        return IdentityAutoencoder(scale_factor, norm)
    from diffusers import AutoencoderKL

    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        subfolder = None if (folder / "config.json").is_file() else "vae"
        if subfolder and not (folder / "vae" / "config.json").is_file():
            raise FileNotFoundError(
                f"autoencoder folder {folder} has no config.json (nor vae/config.json): "
                "save the VAE there with AutoencoderKL.save_pretrained(folder)"
            )
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder)
        return VAEAutoencoder(vae, name, device, scale_factor, precision, norm)
    if Path(name).expanduser().is_file():  # an LDM-format state dict (VA-VAE's release, ...)
        return VAEAutoencoder(load_ldm_vae(Path(name).expanduser()), name, device, scale_factor, precision, norm)
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"autoencoder folder {name} does not exist: set autoencoder.name to a folder saved with "
            "save_pretrained, a Hugging Face id such as stabilityai/sd-vae-ft-ema, or 'identity'"
        )
    vae = _from_hub(AutoencoderKL, name)
    return VAEAutoencoder(vae, name, device, scale_factor, precision, norm)


def _looks_like_path(name: str) -> bool:
    """Hugging Face ids are 'org/name' (or a bare 'name'); anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


class AutoencoderUnavailable(FileNotFoundError):
    """The autoencoder's weights are neither local nor downloadable."""


def _from_hub(cls, name: str):
    """Load from the local Hugging Face cache, else download; a clear error at once when neither works.

    The hub is probed once with a short timeout before any download: offline, the download
    machinery would retry with back-off for half a minute before failing.
    """
    for local_only in (True, False):
        if not local_only and not _hub_reachable():
            break
        for subfolder in (None, "vae"):
            try:
                with warnings.catch_warnings():  # diffusers passes a deprecated argument to huggingface_hub
                    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
                    return cls.from_pretrained(name, subfolder=subfolder, local_files_only=local_only)
            except OSError as err:
                if not local_only and subfolder is None and _is_offline_error(err):
                    break  # the hub is unreachable: asking again for vae/ would only wait longer
    folder = "vae/" + name.rstrip("/").split("/")[-1]
    raise AutoencoderUnavailable(
        f"could not load autoencoder '{name}': it is not in the local Hugging Face cache and could not be "
        "downloaded (offline, or no such repository). Download it on a machine with internet access, e.g. "
        f"`python -c \"from diffusers import AutoencoderKL; AutoencoderKL.from_pretrained('{name}')"
        f".save_pretrained('{folder}')\"`, copy that folder here and set autoencoder.name={folder} "
        "(a local folder saved with save_pretrained), or pre-fill the Hugging Face cache (HF_HOME)."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hugging Face endpoint (False at once when offline or HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _is_offline_error(err: BaseException) -> bool:
    """True when the error chain says the hub could not be reached (rather than 'file not in repo')."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    while err is not None:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        err = err.__cause__ or err.__context__
    return False


SD_VAE_GEOMETRY = (8, 4)  # the SD VAE's down-sampling and latent channels (stabilityai/sd-vae-ft-*)


def autoencoder_geometry(name: str) -> tuple[int, int]:
    """(down-sampling factor, latent channels) of an autoencoder without loading its weights where possible: a
    folder's config.json, an LDM file's shapes; a Hugging Face id is taken for the SD VAE's."""
    path = Path(name).expanduser()
    if path.is_dir():
        import json

        config_file = path / "config.json" if (path / "config.json").is_file() else path / "vae" / "config.json"
        config = json.loads(config_file.read_text())
        return 2 ** (len(config["block_out_channels"]) - 1), int(config["latent_channels"])
    if path.is_file():
        from datasets.ldm_vae import ldm_architecture, read_ldm_state

        config = ldm_architecture(read_ldm_state(path))
        return 2 ** (len(config["block_out_channels"]) - 1), int(config["latent_channels"])
    return SD_VAE_GEOMETRY
