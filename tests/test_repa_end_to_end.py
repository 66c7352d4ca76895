"""REPA end to end on the digits: flow training with the alignment term under torchrun (2 CPU processes),
SIGKILLed midway and resumed, equals an uninterrupted run; its checkpoint carries the projector under REPA's
keys, samples and infers with the backbone alone; fine-tuning across aligned and plain runs works both ways."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_repa import TINY_VIT, tiny_vit_file  # pytest puts tests/ on sys.path

import launch
from methods import registry
from models import create_model
from phases import extract, inference, sample, train
from runtime.checkpoint import load_checkpoint
from runtime.config import load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
REPA = ROOT / "configs/demo/digits_repa.yaml"
STEPS = 12


@pytest.fixture(scope="module")
def repa_setup(digits_cache, tmp_path_factory):
    """The digits cache with its crops added, and a tiny ViT encoder file."""
    root = tmp_path_factory.mktemp("repa")
    cache = root / "digits.h5"
    shutil.copy(digits_cache, cache)
    extract.run(load_config(REPA, [f"data.cache_path={cache}"]))
    tiny_vit_file(root / "vit.pth")
    common = [f"data.cache_path={cache}", f"repa.encoder_weights={root / 'vit.pth'}",
              f"repa.encoder_kwargs={TINY_VIT}".replace("'", ""), "repa.projector_dim=32", "train.batch_size=16",
              "train.ckpt_every=4", "train.log_every=4", "train.progress=false", f"train.max_steps={STEPS}",
              "train.warmup_steps=0", "train.sample_every=0", "train.loss_buckets=2"]
    return {"root": root, "cache": cache, "common": common}


def test_killed_torchrun_repa_training_resumes_to_the_same_result(repa_setup, tmp_path):
    common = repa_setup["common"]
    a, b, stdout = launch.killed_and_resumed_training(REPA, common, tmp_path, STEPS)
    assert "representation alignment: block 2 -> vit_tiny_patch16_224 tokens (24 channels)" in stdout
    assert "proj_loss" in stdout and "proj_t000-499" in (tmp_path / "full/logs/train.jsonl").read_text()
    assert a["model_args"]["alignment"] == {"depth": 2, "projector_dim": 32, "feature_dim": 24}
    assert a["repa"]["encoder"] == "vit_tiny_patch16_224" and "projectors.0.4.weight" in a["ema"]
    launch.assert_same_weights(a, b)
    with pytest.raises(ValueError, match="alignment: .* in .*, None now"):  # resuming without REPA is refused
        train.run(load_config(REPA, [*common, f"experiment_dir={tmp_path / 'full'}", f"train.max_steps={STEPS + 4}",
                                     "repa.enabled=false"]))


def test_an_aligned_checkpoint_samples_and_fine_tunes_both_ways(repa_setup, tmp_path):
    common = [*repa_setup["common"], "train.max_steps=4", "sample.per_class=1", "inference.num_samples=6",
              "inference.batch_size=6"]
    aligned = load_config(REPA, [*common, f"experiment_dir={tmp_path / 'aligned'}"])
    state = load_checkpoint(train.run(aligned))
    plain_weights = {k: v for k, v in state["ema"].items() if not k.startswith("projectors.")}
    assert sample.run(aligned).is_file()  # the backbone alone, the projector dropped
    with np.load(inference.run(aligned)) as npz:
        assert npz["arr_0"].shape == (6, 16, 16, 1) or npz["arr_0"].shape == (6, 16, 16, 3)
    aligned_args = state["model_args"]
    plain_args = {k: v for k, v in aligned_args.items() if k != "alignment"}

    def initialised(args, init_from, *overrides):
        cfg = load_config(REPA, [*common, f"experiment_dir={tmp_path / 'new'}", f"model.init_from={init_from}", *overrides])
        model = create_model(**args)
        train.initialise(cfg, registry.spec("flow"), model)
        return model.state_dict()

    ours = tmp_path / "aligned/checkpoints/0000004.pt"
    started = initialised(plain_args, ours, "repa.enabled=false")  # a plain run from an aligned one
    assert started.keys() == plain_weights.keys()
    for name, tensor in plain_weights.items():  # the backbone's weights copied, the projector left out
        assert torch.equal(started[name], tensor), name
    torch.save({"ema": plain_weights}, tmp_path / "plain.pt")
    fresh = initialised(aligned_args, tmp_path / "plain.pt", "flow.convention=repa")  # an aligned run from a plain model: a new projector
    for name, tensor in plain_weights.items():
        assert torch.equal(fresh[name], tensor), name
    torch.save({"ema": state["ema"], "args": {"path_type": "linear", "prediction": "v", "encoder_depth": 2}},
               tmp_path / "repa-release.pt")  # REPA's own layout: the projector continues
    for source in (ours, tmp_path / "repa-release.pt"):
        continued = initialised(aligned_args, source)
        for name, tensor in state["ema"].items():
            assert torch.equal(continued[name], tensor), f"{source.name}: {name}"
