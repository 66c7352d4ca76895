"""What training logs besides the loss: per-timestep-bucket MSE, MFU, data wait."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion import create_diffusion
from diffusion.timesteps import build_timestep_strategy
from methods.diffusion import DiffusionMethod
from methods.timestep_buckets import TimestepBuckets
from models import create_model
from models.flops import dit_forward_flops
from phases import train
from runtime.checkpoint import load_checkpoint
from runtime.config import load_config
from runtime.console import format_metrics

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits.yaml"


def test_buckets_split_the_timesteps_evenly():
    buckets = TimestepBuckets(1000, 10)
    t = torch.tensor([0, 99, 100, 999, 500])
    assert buckets.bucket_of(t).tolist() == [0, 0, 1, 9, 5]
    assert buckets.names("mse")[:2] == ["mse_t000-099", "mse_t100-199"] and buckets.names("mse")[-1] == "mse_t900-999"
    buckets.add(t, torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]))
    assert buckets.report("mse") == {"mse_t000-099": 2.0, "mse_t100-199": 5.0, "mse_t500-599": 9.0, "mse_t900-999": 7.0}
    assert buckets.report("mse") == {}  # reset after reporting


def test_bucket_means_average_to_the_logged_mse_under_uniform_sampling():
    """Weighted by their counts, the bucket means are exactly the mean per-sample eps-MSE that is logged."""
    torch.manual_seed(0)
    model = create_model("DiT-T/4", input_size=8, in_channels=2, num_classes=3, learn_sigma=False)
    diffusion = create_diffusion(1000, "linear", learn_sigma=False)
    cfg = load_config(CONFIG)
    method = DiffusionMethod(model, diffusion, build_timestep_strategy(cfg.diffusion.timesteps, diffusion, "cpu"), buckets=4)
    logged = []
    for step in range(5):
        x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 3, (16,))
        loss, metrics = method.loss("model", {"model": model}, x, y, torch.Generator().manual_seed(step))
        assert torch.equal(loss.detach(), metrics["mse"])  # no weighting, no VB: the loss is the eps-MSE
        logged.append(metrics["mse"].item())
    sums, counts = method.buckets.sums.clone(), method.buckets.counts.clone()
    report = method.log_metrics()
    assert set(report) == {"mse_t000-249", "mse_t250-499", "mse_t500-749", "mse_t750-999"}
    weighted = sum(report[name] * c for name, c in zip(method.buckets.names("mse"), counts.tolist())) / counts.sum()
    assert weighted.item() == pytest.approx(sum(logged) / len(logged), rel=1e-6)
    assert sums.sum().item() == pytest.approx(16 * sum(logged), rel=1e-6)


def test_training_logs_buckets_mfu_and_data_wait(digits_cache, tmp_path):
    cfg = load_config(CONFIG, [f"data.cache_path={digits_cache}", f"experiment_dir={tmp_path / 'run'}", "train.max_steps=4",
                               "train.batch_size=8", "train.log_every=2", "train.progress=false", "data.holdout=20",
                               "train.eval_every=4", "train.peak_tflops=1.0"])
    train.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    step = next(r for r in records if "loss" in r)
    buckets = [k for k in step if k.startswith("mse_t")]
    assert buckets and all(step[k] >= 0 for k in buckets) and step["data_wait_ms"] >= 0
    flops = 3 * dit_forward_flops(dict(name="DiT-T/4", input_size=16, in_channels=1, learn_sigma=True))
    assert step["mfu"] == pytest.approx(step["img/s"] * flops / 1e12, rel=1e-9)  # 1 TFLOP/s peak, 1 process
    validation = next(r for r in records if "val_mse" in r)
    assert len([k for k in validation if k.startswith("val_mse_t")]) == 10  # eval_timesteps=10: one per bucket
    assert "mse_t" not in format_metrics(2, step)  # the console line stays short


def test_grids_during_training_are_written_and_identical_across_a_resume(digits_cache, tmp_path):
    common = [f"data.cache_path={digits_cache}", "train.batch_size=8", "train.progress=false", "train.log_every=2",
              "train.ckpt_every=2", "train.sample_every=2", "train.sample_steps=3", "sample.classes=[0,5]",
              "sample.per_class=2", "train.keep_last=0"]
    cfg = lambda run, steps: load_config(CONFIG, [f"experiment_dir={tmp_path / run}", f"train.max_steps={steps}", *common])
    full = load_checkpoint(train.run(cfg("full", 4)))
    train.run(cfg("split", 2))
    resumed = load_checkpoint(train.run(cfg("split", 4)))
    grids = sorted(p.name for p in (tmp_path / "full" / "samples" / "train").iterdir())
    assert grids == ["0000002.png", "0000004.png"]
    for name in grids:
        a = (tmp_path / "full" / "samples" / "train" / name).read_bytes()
        assert a == (tmp_path / "split" / "samples" / "train" / name).read_bytes(), name
    first, last = (Image.open(tmp_path / "full" / "samples" / "train" / n) for n in grids)
    assert first.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2) and first.tobytes() != last.tobytes()  # the model moved
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name  # sampling did not disturb training
