"""scripts/memory_estimate.py: the per-GPU model-state arithmetic of DDP, FSDP and HSDP, on real models built on
the meta device."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import memory_estimate  # noqa: E402


def test_ddp_holds_everything_and_fsdp_a_share_of_it():
    total, block = 10 * 2**30, 2**30  # in parameters: results in GiB per byte-per-parameter
    ddp = memory_estimate.per_gpu(total, block, "ddp", 1)
    assert ddp["weights"] == 40 and ddp["adamw"] == 80 and ddp["buckets"] == 40 and ddp["total"] == 240
    fsdp = memory_estimate.per_gpu(total, block, "fsdp", 8)
    assert fsdp["weights"] == 5 and fsdp["adamw"] == 10 and fsdp["ema"] == 5 and fsdp["buckets"] == 0
    assert fsdp["gathered"] == 2 * 2 + 4  # two bf16 blocks and one block's fp32 gradients
    assert fsdp["total"] == pytest.approx(25 + 8)


def test_real_models_on_the_meta_device(capsys):
    label, model = memory_estimate.build("DiT-XL/2", None)
    total, block = memory_estimate.count(model)
    assert 670e6 < total < 680e6 and block == sum(p.numel() for p in model.blocks[0].parameters())
    _, custom = memory_estimate.build(None, [40, 2048, 16])
    assert 3.0e9 < memory_estimate.count(custom)[0] < 3.1e9
    assert memory_estimate.main(["--model", "DiT-S/2", "--gpus", "8", "16"]) == 0
    out = capsys.readouterr().out
    assert "### DiT-S/2" in out and "| 16 | hsdp | 8 |" in out and "| 8 | fsdp | 8 |" in out
    assert "| 8 | hsdp" not in out  # one node: HSDP is FSDP
