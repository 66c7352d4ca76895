"""Flow matching end to end on the digits demo: training under torchrun (2 CPU processes) SIGKILLed midway and
resumed equals an uninterrupted run; the validation loss; and the published formats, tiny and built here with
their key layouts (SiT's release, SiT's and REPA's train.py checkpoints, REPA's with projector weights), sample,
infer and initialise training exactly as our own checkpoint of the same weights in the same time convention."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
from models import create_model
from phases import inference, sample, train
from runtime.checkpoint import load_checkpoint
from runtime.config import ConfigError, load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits_flow.yaml"
STEPS = 16
TRAIN = ["train.batch_size=16", "train.ckpt_every=4", "train.log_every=4", "train.progress=false",
         f"train.max_steps={STEPS}", "train.warmup_steps=0", "flow.cosine_loss=1.0", "flow.time_sampling=logit_normal",
         "train.sample_every=0"]
MARGS = dict(name="DiT-T/4", input_size=16, in_channels=1, num_classes=10, class_dropout_prob=0.1)


def test_killed_torchrun_flow_training_resumes_to_the_same_result(digits_cache, tmp_path):
    common = [f"data.cache_path={digits_cache}", *TRAIN]
    a, b, _ = launch.killed_and_resumed_training(CONFIG, common, tmp_path, STEPS)
    assert a["method"] == "flow" and a["flow"]["convention"] == "repa" and a["flow"]["path"] == "linear"
    launch.assert_same_weights(a, b)
    records = [json.loads(line) for line in (tmp_path / "full" / "logs" / "train.jsonl").read_text().splitlines()]
    last = records[-1]
    assert {"loss", "mse", "cos_loss", "mfu"} - set(last) == {"mfu"} and any(k.startswith("mse_t") for k in last)
    assert last["loss"] == pytest.approx(last["mse"] + last["cos_loss"], rel=1e-5)


def test_flow_validation_loss(digits_cache, tmp_path):
    cfg = load_config(CONFIG, [f"data.cache_path={digits_cache}", f"experiment_dir={tmp_path}", "train.batch_size=8",
                               "train.max_steps=2", "train.progress=false", "train.log_every=2", "data.holdout=16",
                               "train.eval_every=2", "train.eval_timesteps=4"])
    train.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "logs" / "train.jsonl").read_text().splitlines()]
    validation = next(r for r in records if "val_mse" in r)
    assert validation["val_mse"] > 0 and validation["val_ema_mse"] > 0
    assert len([k for k in validation if k.startswith("val_mse_t")]) == 4


def weights(seed, learn_sigma):
    torch.manual_seed(seed)
    model = create_model(**MARGS, learn_sigma=learn_sigma)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    return model.state_dict()


def projectors(hidden=128, projector=32, feature=24):
    """REPA's projector MLP (hidden -> projector -> projector -> feature), saved beside the SiT."""
    layers = {0: (projector, hidden), 2: (projector, projector), 4: (feature, projector)}
    out = {}
    for index, (rows, cols) in layers.items():
        out[f"projectors.0.{index}.weight"] = torch.randn(rows, cols)
        out[f"projectors.0.{index}.bias"] = torch.randn(rows)
    return out


def published(kind):
    """(the file's content, its weights, the time convention it was trained in)."""
    if kind == "SiT release":  # SiT-XL-2-256x256.pt: a bare state dict with the learned-sigma channels
        state = weights(0, learn_sigma=True)
        return state, state, "sit"
    if kind == "SiT train.py":
        model, ema = weights(1, True), weights(2, True)
        args = argparse.Namespace(model="SiT-XL/2", path_type="Linear", prediction="velocity", loss_weight=None,
                                  sample_eps=1e-3, train_eps=1e-5, global_batch_size=256)
        opt = torch.optim.AdamW(create_model(**MARGS).parameters(), lr=1e-4).state_dict()
        return {"model": model, "ema": ema, "opt": opt, "args": args}, ema, "sit"
    if kind == "REPA train.py":
        ema = weights(3, learn_sigma=False)
        args = argparse.Namespace(model="SiT-XL/2", path_type="linear", prediction="v", enc_type="dinov2-vit-b",
                                  proj_coeff=0.5, encoder_depth=2, qk_norm=False)
        return {"model": {**ema, **projectors()}, "ema": {**ema, **projectors()}, "opt": {}, "args": args,
                "steps": 4000}, ema, "repa"
    if kind == "REPA release":  # last.pt: the EMA weights and the projectors
        ema = weights(4, learn_sigma=False)
        return {"ema": {**ema, **projectors()}}, ema, "repa"
    raise ValueError(kind)


def ours(state, convention, path):
    """The same weights as a checkpoint of this tool (its metadata says everything)."""
    learn_sigma = state["final_layer.linear.weight"].shape[0] == 2 * 16
    torch.save({"ema": state, "model_args": {**MARGS, "learn_sigma": learn_sigma},
                "autoencoder": {"name": "identity", "scale_factor": 1.0}, "method": "flow",
                "flow": {"path": "linear", "prediction": "velocity", "convention": convention, "loss_weight": "none",
                         "train_eps": 1e-5, "sample_eps": 1e-3}}, path)
    return path


def cfg_for(cache, tmp_path, *extra):
    return load_config(CONFIG, [f"data.cache_path={cache}", f"experiment_dir={tmp_path / 'run'}", "sample.steps=3",
                                "sample.classes=[1,2]", "sample.per_class=1", "sample.sampler=sde",
                                "sample.cfg_interval=[0.0,0.7]", *extra])


@pytest.mark.parametrize("kind", ["SiT release", "SiT train.py", "REPA train.py", "REPA release"])
def test_published_flow_checkpoints_sample_and_infer_as_our_own(digits_cache, tmp_path, kind):
    content, state, convention = published(kind)
    path = tmp_path / "published.pt"
    torch.save(content, path)
    extra = ["flow.convention=sit"] if kind == "SiT release" else []
    npz = lambda ckpt, name: inference.run(cfg_for(digits_cache, tmp_path, f"ckpt={ckpt}", "inference.num_samples=3",
                                                   f"inference.output={tmp_path / name}", *extra))
    with np.load(npz(path, "published.npz")) as theirs, np.load(npz(ours(state, convention, tmp_path / "o.pt"),
                                                                    "ours.npz")) as mine:
        assert theirs["arr_0"].shape == (3, 16, 16, 1) and theirs["arr_0"].std() > 0
        assert np.array_equal(theirs["arr_0"], mine["arr_0"]) and np.array_equal(theirs["arr_1"], mine["arr_1"])
    grid = sample.run(cfg_for(digits_cache, tmp_path, f"ckpt={path}", *extra))
    assert grid.is_file()


def test_a_bare_state_dict_sampled_as_a_flow_model_must_say_its_time(digits_cache, tmp_path):
    content, _, _ = published("SiT release")
    torch.save(content, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="cannot say how it was trained: .*set flow.convention=sit"):
        sample.run(cfg_for(digits_cache, tmp_path, f"ckpt={tmp_path / 'bare.pt'}"))
    assert not (tmp_path / "run" / "samples").exists()
    # asked of a diffusion sampler, the same file is a DiT, as DiT's release
    assert sample.run(cfg_for(digits_cache, tmp_path, f"ckpt={tmp_path / 'bare.pt'}", "sample.sampler=ddim",
                              "sample.cfg_interval=null")).is_file()


def test_training_starts_from_published_flow_checkpoints_of_its_time_convention(digits_cache, tmp_path):
    common = [f"data.cache_path={digits_cache}", "train.batch_size=8", "train.max_steps=1", "train.progress=false"]
    repa, _, _ = published("REPA train.py")
    torch.save(repa, tmp_path / "repa.pt")
    train.run(load_config(CONFIG, [*common, f"experiment_dir={tmp_path / 'a'}", f"model.init_from={tmp_path / 'repa.pt'}",
                                   "model.learn_sigma=false"]))  # projectors dropped, the rest copied
    sit, _, _ = published("SiT train.py")
    torch.save(sit, tmp_path / "sit.pt")
    with pytest.raises(ConfigError, match="trained in the sit time convention .* set flow.convention=sit"):
        train.run(load_config(CONFIG, [*common, f"experiment_dir={tmp_path / 'b'}", f"model.init_from={tmp_path / 'sit.pt'}"]))
    assert not (tmp_path / "b" / "checkpoints").exists()
    ckpt = train.run(load_config(CONFIG, [*common, f"experiment_dir={tmp_path / 'c'}",
                                          f"model.init_from={tmp_path / 'sit.pt'}", "flow.convention=sit"]))
    assert load_checkpoint(ckpt)["flow"]["convention"] == "sit"
