"""FID over checkpoints (evaluate.checkpoints, train.fid_every) with a stand-in feature network
(the Inception weights cannot be downloaded here)."""
import json
from pathlib import Path

import numpy as np
import pytest

import phases.generation
from stand_ins import StandInFeatures
from phases import evaluate, scoring, train
from runtime.config import ConfigError, load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits.yaml"


@pytest.fixture
def setup(digits_cache, tmp_path, monkeypatch):
    cache = digits_cache
    reference = np.random.default_rng(0).integers(0, 255, size=(20, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / "reference.npz", reference)
    monkeypatch.setattr(scoring, "feature_network", lambda cfg, device: StandInFeatures())
    common = [f"data.cache_path={cache}", f"experiment_dir={tmp_path / 'run'}", "train.batch_size=8",
              "train.progress=false", "train.ckpt_every=2", "train.log_every=2", "train.keep_last=0",
              f"evaluate.reference={tmp_path / 'reference.npz'}", "evaluate.num_samples=6", "evaluate.sampler=ddim",
              "evaluate.steps=3", "inference.batch_size=4"]
    return tmp_path, common


def test_fid_over_two_checkpoints_then_nothing_to_redo(setup, monkeypatch):
    tmp_path, common = setup
    train.run(load_config(CONFIG, [*common, "train.max_steps=4"]))
    result = evaluate.run(load_config(CONFIG, [*common, "evaluate.checkpoints=all"]))
    assert [p["step"] for p in result["points"]] == [2, 4] and all(np.isfinite(p["fid"]) for p in result["points"])
    record = json.loads((tmp_path / "run" / "eval" / "fid_vs_step.json").read_text())
    assert sorted(p["step"] for p in record["points"]) == [2, 4]
    assert (tmp_path / "run" / "eval" / "fid_vs_step.png").is_file()
    assert not list((tmp_path / "run" / "eval" / "sweep").glob("*.npz"))  # images deleted once scored
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "logs" / "evaluate.jsonl").read_text().splitlines()]
    assert steps_logged == [2, 4]

    def never(*args, **kwargs):
        raise AssertionError("an evaluated checkpoint was sampled again")

    monkeypatch.setattr(phases.generation.Generator, "images", never)
    assert evaluate.run(load_config(CONFIG, [*common, "evaluate.checkpoints=[2,4]"]))["points"] == []
    assert json.loads((tmp_path / "run" / "eval" / "fid_vs_step.json").read_text()) == record
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step\(s\) \[6\]"):
        evaluate.run(load_config(CONFIG, [*common, "evaluate.checkpoints=[2,6]"]))


@pytest.mark.parametrize("config,sampler", [(CONFIG, "ddim"), (ROOT / "configs/demo/digits_flow.yaml", "ode")])
def test_fid_every_inside_training(setup, config, sampler):
    tmp_path, common = setup
    train.run(load_config(config, [*common, "train.max_steps=4", "train.fid_every=2", f"evaluate.sampler={sampler}"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fid" in r] == [2, 4] and all(r["fid"] >= 0 for r in records if "fid" in r)
    with pytest.raises(ConfigError, match="multiple of train.ckpt_every"):
        load_config(CONFIG, [*common, "train.fid_every=3"])
