"""Checkpoints written by the reference repos' own train.py (DiT, fast-DiT, SpeeD) load for sample, inference
and model.init_from, still with torch.load(weights_only=True): their pickled arguments (an argparse
Namespace, an OmegaConf DictConfig) are allowed, nothing else is."""
import argparse
import collections
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from phases import inference, train
from phases.generation import load_generator
from runtime.checkpoint import BrokenCheckpointError, load_checkpoint
from runtime.config import load_config, sampler_settings
from models import create_model

from pathlib import Path

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits.yaml"
MARGS = dict(name="DiT-T/4", input_size=16, in_channels=1, num_classes=10, learn_sigma=True, class_dropout_prob=0.1)


def weights(seed):
    torch.manual_seed(seed)
    model = create_model(**MARGS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    return model.state_dict()


def reference_checkpoint(kind: str) -> dict:
    """The dict each repo's train.py saves: model, ema, opt and its arguments."""
    model, ema = weights(0), weights(1)
    opt = torch.optim.AdamW(create_model(**MARGS).parameters(), lr=1e-4).state_dict()
    if kind == "DiT":
        args = argparse.Namespace(model="DiT-T/4", image_size=16, num_classes=10, global_batch_size=256, epochs=1400)
        return {"model": model, "ema": ema, "opt": opt, "args": args}
    if kind == "fast-DiT":  # saved from the DDP-wrapped model: "module." prefixes
        args = argparse.Namespace(model="DiT-T/4", feature_path="features", num_classes=10)
        return {"model": collections.OrderedDict(("module." + k, v) for k, v in model.items()), "ema": ema,
                "opt": opt, "args": args}
    if kind == "SpeeD":
        args = OmegaConf.create({"model": {"name": "DiT-T/4", "num_classes": 10}, "lr": 1e-4, "steps": [1, 2],
                                 "speed": {"tau": 700, "k": 5.0, "dual": True}, "note": None})
        return {"model": model, "ema": ema, "opt": opt, "args": args}
    raise ValueError(kind)


def cfg_for(digits_cache, tmp_path, *extra):
    return load_config(CONFIG, [f"data.cache_path={digits_cache}", f"experiment_dir={tmp_path / 'run'}", "sample.steps=3",
                                "sample.classes=[1,2]", "sample.per_class=1", *extra])


@pytest.mark.parametrize("kind", ["DiT", "fast-DiT", "SpeeD"])
def test_reference_train_checkpoints_sample_infer_and_initialise(digits_cache, tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    torch.save(reference_checkpoint(kind), path)
    cfg = cfg_for(digits_cache, tmp_path)
    generator = load_generator(cfg, path, sampler_settings(cfg, "sample"), True, torch.device("cpu"))
    ema = weights(1)
    assert all(torch.equal(generator.model.state_dict()[k], v) for k, v in ema.items())  # EMA preferred
    assert generator.images(torch.tensor([1, 2]), [0, 1]).shape == (2, 16, 16, 1)

    out = inference.run(cfg_for(digits_cache, tmp_path, f"ckpt={path}", "inference.num_samples=3",
                                f"inference.output={tmp_path / 'samples.npz'}"))
    with np.load(out) as samples:
        assert samples["arr_0"].shape == (3, 16, 16, 1)

    first = load_checkpoint(train.run(cfg_for(digits_cache, tmp_path, f"model.init_from={path}", "train.max_steps=1",
                                              "train.lr=1e-12", "train.warmup_steps=0", "train.batch_size=8",
                                              "train.progress=false")))
    assert all(torch.allclose(first["model"][k], v, atol=1e-6) for k, v in ema.items())


class NotData:
    def __reduce__(self):
        return (os.getcwd, ())


def test_anything_else_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": weights(0), "args": NotData()}, path)
    with pytest.raises(BrokenCheckpointError, match="holds an object this tool does not unpickle.*getcwd") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
