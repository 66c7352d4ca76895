"""What only a CUDA GPU can show (`pytest -m gpu`; skipped without one; scripts/gpu_check.py runs them):
NCCL under torchrun, bf16 autocast with fp32 master weights, torch.compile, fused AdamW, and the CUDA RNG state
carried across a resume. Each trains the digits demo for a few steps on the GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.e2e,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = str(ROOT / "configs/demo/digits.yaml")


def _train(tmp_path, run, cache, *overrides, torchrun=False):
    main = [str(ROOT / "main.py"), "-c", CONFIG, "-p", "train", f"experiment_dir={tmp_path / run}",
            f"data.cache_path={cache}", "train.progress=false", "train.sample_every=0", "train.log_every=1", *overrides]
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *main] if torchrun
               else [sys.executable, *main])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _log(tmp_path, run):
    return [json.loads(line) for line in (tmp_path / run / "logs" / "train.jsonl").read_text().splitlines()]


def _checkpoint(tmp_path, run, step):
    return torch.load(tmp_path / run / "checkpoints" / f"{step:07d}.pt", map_location="cpu", weights_only=True)


def test_torchrun_on_a_gpu_uses_nccl(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                     "import torch.distributed as t\nfrom runtime import distributed as d\n"
                     "d.init(); print('backend', t.get_backend()); d.shutdown()\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(probe)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "backend nccl" in done.stdout, done.stdout + done.stderr


def test_bf16_training_on_the_gpu_keeps_fp32_master_weights(tmp_path, digits_cache):
    _train(tmp_path, "bf16", digits_cache, "train.precision=bf16", "train.max_steps=20", "train.ckpt_every=20",
           torchrun=True)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _log(tmp_path, "bf16"))
    state = _checkpoint(tmp_path, "bf16", 20)
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float32}
    assert {t.dtype for t in state["ema"].values() if t.is_floating_point()} == {torch.float32}


def test_compiled_training_follows_eager_training(tmp_path, digits_cache):
    """Same data, seed and weights: the compiled model's losses track the eager ones (kernels differ in rounding)."""
    for run, compiled in (("eager", "false"), ("compiled", "true")):
        _train(tmp_path, run, digits_cache, f"train.compile={compiled}", "train.max_steps=10", "train.ckpt_every=10")
    eager, compiled = ([r["loss"] for r in _log(tmp_path, run)] for run in ("eager", "compiled"))
    assert len(eager) == len(compiled) == 10
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-2, atol=1e-3)


def test_adamw_is_fused_on_cuda():
    from runtime import training_loop

    class OneNet:
        def __init__(self):
            self.net = torch.nn.Linear(4, 4).cuda()

        def modules(self):
            return {"model": self.net}

        def objectives(self):
            return [type("Objective", (), {"name": "model", "modules": ("model",), "lr_scale": 1.0})()]

    settings = type("Settings", (), {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0})()
    optimizer = training_loop._build_optimizers(OneNet(), settings, torch.device("cuda"))["model"]
    assert optimizer.param_groups[0]["fused"] is True


def test_resume_restores_the_cuda_rng_state(tmp_path, digits_cache):
    """10 steps straight vs 5, stop, resume to 10: the checkpoint holds the CUDA generator's state and the resumed
    run draws the same label dropout and noise (equal weights up to CUDA's non-deterministic reductions)."""
    common = ("train.ckpt_every=5", "train.keep_last=0", "train.warmup_steps=0")
    _train(tmp_path, "straight", digits_cache, "train.max_steps=10", *common)
    _train(tmp_path, "resumed", digits_cache, "train.max_steps=5", *common)
    assert "cuda" in _checkpoint(tmp_path, "resumed", 5)["rng"]
    output = _train(tmp_path, "resumed", digits_cache, "train.max_steps=10", *common)
    assert "resumed from step 5" in output
    straight, resumed = _checkpoint(tmp_path, "straight", 10), _checkpoint(tmp_path, "resumed", 10)
    for key in straight["ema"]:
        torch.testing.assert_close(resumed["ema"][key], straight["ema"][key], rtol=1e-4, atol=1e-5)
    losses = [[r["loss"] for r in _log(tmp_path, run) if r["step"] > 5] for run in ("straight", "resumed")]
    torch.testing.assert_close(torch.tensor(losses[1][-5:]), torch.tensor(losses[0][-5:]), rtol=1e-3, atol=1e-5)
