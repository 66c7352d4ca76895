"""MeanFlow end to end on the digits demo: training under torchrun (2 CPU processes) SIGKILLed midway and resumed
equals an uninterrupted run; sample and inference take 1, 2 or N steps from its checkpoints; what it cannot do
is refused before any work; it starts from a flow model through model.init_from."""
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
from methods import registry
from phases import inference, sample, train
from runtime.config import ConfigError, load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits_meanflow.yaml"
STEPS = 8
TRAIN = ["train.batch_size=16", "train.ckpt_every=4", "train.log_every=4", "train.progress=false",
         f"train.max_steps={STEPS}", "train.warmup_steps=0", "train.sample_every=4", "sample.classes=[1,7]",
         "sample.per_class=2", "sample.batch_size=4"]


@pytest.fixture(scope="module")
def trained(digits_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("meanflow")
    common = [f"data.cache_path={digits_cache}", *TRAIN]
    a, b, stdout = launch.killed_and_resumed_training(CONFIG, common, root, STEPS)
    return {"root": root, "common": common, "full": a, "resumed": b, "stdout": stdout}


def test_a_killed_meanflow_run_resumes_exactly(trained):
    a, b = trained["full"], trained["resumed"]
    launch.assert_same_weights(a, b)
    assert a["method"] == "meanflow" and a["model_args"]["interval_embedding"] is True
    assert a["meanflow"]["cfg_scale"] == 2.0 and a["meanflow"]["times"]["ratio"] == 0.25
    assert any(k.startswith("interval_embedder.") for k in a["model"])
    for sa, sb in zip(a["optimizers"]["model"]["state"].values(), b["optimizers"]["model"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert "mse_flow" in trained["stdout"] and "method meanflow" in trained["stdout"]
    grids = sorted(p.name for p in (trained["root"] / "full" / "samples" / "train").glob("*.png"))
    assert grids == ["0000004.png", "0000008.png"]


def test_sample_and_inference_in_one_two_and_four_steps(trained, tmp_path):
    exp = trained["root"] / "full"
    base = [f"experiment_dir={exp}", *trained["common"], "inference.num_samples=6"]
    arrays = {}
    for steps in (1, 2, 4):
        overrides = [*base, f"sample.steps={steps}", f"inference.steps={steps}",
                     f"sample.output={tmp_path / f's{steps}'}"]
        assert sample.run(load_config(CONFIG, overrides)).is_file()
        npz = inference.run(load_config(CONFIG, [*overrides, "inference.batch_size=4",
                                                 f"inference.output={tmp_path / f'{steps}.npz'}"]))
        with np.load(npz) as data:
            arrays[steps] = data["arr_0"].copy()
    assert arrays[1].shape == (6, 16, 16, 1) and arrays[1].std() > 0
    assert not np.array_equal(arrays[1], arrays[2])  # two jumps are not one
    again = inference.run(load_config(CONFIG, [*base, "inference.steps=1", "inference.batch_size=5",
                                               f"inference.output={tmp_path / 'again.npz'}"]))
    with np.load(again) as data:
        assert np.array_equal(data["arr_0"], arrays[1])  # an image does not depend on its batch


@pytest.mark.parametrize("override, message", [
    ("sample.sampler=ode", "MeanFlow model .*: it samples with meanflow"),
    ("sample.steps=0", "needs steps >= 1"),
    ("sample.cfg_scale=2.0", "classifier-free guidance is not part of a MeanFlow model"),
])
def test_sampling_settings_it_cannot_honour(trained, override, message):
    with pytest.raises(ValueError, match=message):
        sample.run(load_config(CONFIG, [f"experiment_dir={trained['root'] / 'full'}", *trained["common"], override]))


@pytest.mark.parametrize("override, message", [
    ("train.compile=true", "torch.compile does not trace MeanFlow's forward-mode JVP"),
    ("model.grad_checkpointing=true", "activation checkpointing cannot recompute"),
    ("meanflow.t_std=0", "asks for samples with r != t"),
    ("model.class_dropout_prob=0", "needs the null class"),
])
def test_training_settings_it_cannot_use_stop_before_any_work(digits_cache, tmp_path, override, message):
    extra = ["meanflow.r_std=0", "meanflow.r_mean=-0.4"] if override.startswith("meanflow.t_std") else []
    cfg = load_config(CONFIG, [f"experiment_dir={tmp_path}", f"data.cache_path={digits_cache}", override, *extra])
    with pytest.raises(ConfigError, match=message):
        train.run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_a_flow_model_starts_a_meanflow_run(digits_cache, tmp_path, capsys):
    flow = tmp_path / "flow"
    common = [f"data.cache_path={digits_cache}", "train.batch_size=16", "train.progress=false", "train.sample_every=0",
              "train.max_steps=2", "train.ckpt_every=2"]
    launch.main_py(ROOT / "configs/demo/digits_flow.yaml", "-p", "train", f"experiment_dir={flow}", *common)
    run = train.run(load_config(CONFIG, [f"experiment_dir={tmp_path / 'meanflow'}", *common,
                                         f"model.init_from={flow / 'checkpoints' / '0000002.pt'}"]))
    assert "new interval_embedder: zero-initialised" in capsys.readouterr().out and run.is_file()
    sit = {"method": "flow", "flow": {"convention": "sit", "path": "linear", "prediction": "velocity"}}
    with pytest.raises(ConfigError, match="continues only from a linear-path velocity model in repa time"):
        registry.spec("meanflow").check_init(sit, load_config(CONFIG, ["model.init_from=sit.pt"]))
