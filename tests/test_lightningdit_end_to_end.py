"""LightningDiT end to end: flow training under torchrun (2 CPU processes) SIGKILLed midway and resumed equals an
uninterrupted run; a VA-VAE-like 32-channel autoencoder (an LDM-format file, built here) extracts a cache with
per-channel statistics, which training, sampling and inference use; a cache without them is refused."""
import shutil
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_datasets_image_folder import make_image_folder  # pytest puts tests/ on sys.path

import launch
from datasets.latent_cache import LatentDataset, read_cache_info
from datasets.latent_norm import LatentNorm, read_stats_file
from ldm_files import ldm_vae_state
from phases import extract, inference, sample, train
from runtime.checkpoint import load_checkpoint
from runtime.config import load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "configs/demo/digits_flow.yaml"
STEPS = 16


def test_killed_torchrun_lightningdit_flow_training_resumes_to_the_same_result(digits_cache, tmp_path):
    common = [f"data.cache_path={digits_cache}", "model.name=LightningDiT-T/4", "model.qk_norm=true",
              "train.batch_size=16", "train.ckpt_every=4", "train.log_every=4", "train.progress=false",
              f"train.max_steps={STEPS}", "train.warmup_steps=0", "train.sample_every=0", "flow.cosine_loss=1.0"]
    a, b, _ = launch.killed_and_resumed_training(FLOW, common, tmp_path, STEPS)
    assert a["model_args"]["name"] == "LightningDiT-T/4" and a["model_args"]["qk_norm"] and a["model_args"]["rope"]
    assert "feat_rope.freqs_cos" in a["model"] and "blocks.0.attn.q_norm.weight" in a["model"]
    launch.assert_same_weights(a, b)
    with pytest.raises(ValueError, match="rope: True in .*, False now"):  # resuming with another block is refused
        train.run(load_config(FLOW, [*common, f"experiment_dir={tmp_path / 'full'}", f"train.max_steps={STEPS + 4}",
                                     "model.rope=false"]))


@pytest.fixture(scope="module")
def vavae_cache(tmp_path_factory):
    """An image folder extracted through an LDM-format file of a 32-channel VAE with attention in its lowest level."""
    root = tmp_path_factory.mktemp("vavae")
    images = make_image_folder(root / "images")
    torch.save({"state_dict": ldm_vae_state(ch=32, mult=(1, 1), blocks=1, z=32, attention_levels=(1,))},
               root / "vavae-tiny-f2d32.pt")
    config = root / "vavae.yaml"
    config.write_text(textwrap.dedent(f"""\
        experiment_dir: {root / 'run'}
        data: {{source: folder, image_root: {images}, image_size: 16, cache_path: {root / 'cache.h5'}, num_workers: 0}}
        autoencoder: {{name: {root / 'vavae-tiny-f2d32.pt'}, normalization: channel}}
        extract: {{batch_size: 8, num_workers: 0, precision: fp32}}
        model: {{name: LightningDiT-T/2, num_classes: 3, method: flow, learn_sigma: false}}
        train: {{batch_size: 4, max_steps: 2, ckpt_every: 2, progress: false, precision: fp32, log_every: 1}}
        sample: {{sampler: ode, steps: 3, classes: [0, 2], per_class: 1, precision: fp32, cfg_scale: 2.0}}
        inference: {{num_samples: 3, batch_size: 2}}
        """))
    extract.run(load_config(config))
    return {"root": root, "config": config, "cache": root / "cache.h5"}


def test_a_32_channel_cache_trains_samples_and_infers_with_its_per_channel_statistics(vavae_cache, tmp_path):
    info = read_cache_info(vavae_cache["cache"])
    assert info["latent_shape"] == (32, 8, 8) and len(info["latent_mean"]) == len(info["latent_std"]) == 32
    norm = LatentNorm.from_statistics(info["latent_mean"], info["latent_std"])
    dataset = LatentDataset(vavae_cache["cache"], norm=norm)
    latents = torch.stack([dataset[(i, i)][0] for i in range(len(dataset))])
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.35 and (per_channel.std(1) - 1).abs().max() < 0.35  # about N(0, 1)
    cfg = load_config(vavae_cache["config"], [f"experiment_dir={tmp_path}"])
    state = load_checkpoint(train.run(cfg))
    stored = LatentNorm.from_dict(state["autoencoder"]["normalization"])
    assert stored == norm and state["model_args"]["in_channels"] == 32
    grid = sample.run(cfg)
    assert grid.is_file()
    with np.load(inference.run(cfg)) as npz:
        assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].std() > 0


def test_a_cache_without_statistics_is_refused_before_any_work(vavae_cache, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(vavae_cache["cache"], old)
    with h5py.File(old, "r+") as handle:  # as a cache of an earlier version
        del handle.attrs["latent_mean"], handle.attrs["latent_std"]
    cfg = load_config(vavae_cache["config"], [f"experiment_dir={tmp_path / 'run'}", f"data.cache_path={old}"])
    with pytest.raises(ValueError, match="has no per-channel latent statistics"):
        train.run(cfg)
    assert not (tmp_path / "run").exists()
    scale = load_config(vavae_cache["config"], [f"experiment_dir={tmp_path / 'run'}", f"data.cache_path={old}",
                                                "autoencoder.normalization=scale"])
    assert "normalization" not in load_checkpoint(train.run(scale))["autoencoder"]


def test_a_released_lightningdit_samples_with_vavae_decoding_and_the_releases_statistics(vavae_cache, tmp_path):
    """LightningDiT's train.py checkpoint (its config's transport says SiT's time) and its bare EMA, sampled with
    the autoencoder's LDM file and a latents_stats.pt, without any cache, equal our own checkpoint of the weights."""
    from test_lightningdit import release_state_dict

    weights = release_state_dict(depth=6, width=128, heads=4, patch=2, channels=32, classes=3, size=8, seed=5)
    release = {"model": weights, "ema": weights, "opt": {}, "config": {
        "transport": {"path_type": "Linear", "prediction": "velocity", "loss_weight": None, "use_cosine_loss": True},
        "model": {"model_type": "LightningDiT-T/2"}}}
    torch.save(release, tmp_path / "lightningdit-release.pt")
    torch.save(weights, tmp_path / "bare.pt")
    stats = read_cache_info(vavae_cache["cache"])
    torch.save({"mean": torch.tensor(stats["latent_mean"]).view(1, 32, 1, 1),
                "std": torch.tensor(stats["latent_std"]).view(1, 32, 1, 1)}, tmp_path / "latents_stats.pt")
    norm = LatentNorm.from_statistics(*read_stats_file(tmp_path / "latents_stats.pt"))  # the file's float32 values
    torch.save({"ema": weights, "model_args": {"name": "LightningDiT-T/2", "input_size": 8, "in_channels": 32,
                                               "num_classes": 3, "learn_sigma": False, "class_dropout_prob": 0.1},
                "autoencoder": {"name": str(vavae_cache["root"] / "vavae-tiny-f2d32.pt"), "scale_factor": 1.0,
                                "normalization": norm.as_dict()},
                "method": "flow", "flow": {"path": "linear", "prediction": "velocity", "convention": "sit",
                                           "loss_weight": "none", "train_eps": 1e-5, "sample_eps": 1e-3}},
               tmp_path / "ours.pt")
    common = [f"data.cache_path={tmp_path / 'no-cache.h5'}", f"autoencoder.latent_stats={tmp_path / 'latents_stats.pt'}",
              "sample.cfg_interval=[0,0.875]", "sample.time_shift=3.3333333333333335", "sample.cfg_all_channels=false"]
    outputs = {}
    for name in ("lightningdit-release.pt", "bare.pt", "ours.pt"):
        extra = ["flow.convention=sit"] if name == "bare.pt" else []
        cfg = load_config(vavae_cache["config"], [*common, *extra, f"ckpt={tmp_path / name}",
                                                  f"inference.output={tmp_path / (name + '.npz')}"])
        with np.load(inference.run(cfg)) as npz:
            outputs[name] = npz["arr_0"]
    assert outputs["ours.pt"].shape == (3, 16, 16, 3) and outputs["ours.pt"].std() > 0
    assert np.array_equal(outputs["lightningdit-release.pt"], outputs["ours.pt"])
    assert np.array_equal(outputs["bare.pt"], outputs["ours.pt"])
