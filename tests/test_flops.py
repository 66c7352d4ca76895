"""Model FLOPs of DiT from the architecture, and MFU."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import create_model
from models.flops import dit_forward_flops, dit_forward_macs, mfu, peak_tflops


@pytest.mark.parametrize("margs", [
    dict(name="DiT-T/4", input_size=16, in_channels=1, num_classes=10, learn_sigma=True),
    dict(name="DiT-S/2", input_size=32, in_channels=4, num_classes=10, learn_sigma=True),
    dict(name="DiT-T/2", input_size=8, in_channels=3, num_classes=10, learn_sigma=False, guidance_embedding=True),
    dict(name="LightningDiT-T/4", input_size=16, in_channels=1, num_classes=10, learn_sigma=False),
    dict(name="LightningDiT-S/1", input_size=8, in_channels=32, num_classes=10, learn_sigma=False, rope=False,
         adaln_shift=False, qk_norm=True),
    dict(name="LightningDiT-T/2", input_size=8, in_channels=4, num_classes=10, swiglu=False, rmsnorm=False, z_dim=8),
])
def test_formula_equals_torchs_flop_counter(margs):
    """Every matmul of one forward pass, counted by torch (attention as explicit matmuls so it is seen)."""
    model = create_model(**margs).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    x = torch.randn(1, margs["in_channels"], margs["input_size"], margs["input_size"])
    extra = {"s": torch.tensor([2.0])} if margs.get("guidance_embedding") else {}
    if margs.get("z_dim"):
        extra["z"] = torch.randn(1, margs["z_dim"])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([5.0]), torch.tensor([1]), **extra)
    assert dit_forward_flops(margs) == counter.get_total_flops()


def test_dit_xl2_is_the_papers_118_6_gflops():
    macs = dit_forward_macs(dict(name="DiT-XL/2", input_size=32, in_channels=4, learn_sigma=True))
    assert macs / 1e9 == pytest.approx(118.6, abs=0.05)  # DiT paper, Table 4 (fvcore counts multiply-adds)


def test_mfu_by_hand():
    train_flops = 3 * 2 * 118.6e9  # DiT-XL/2: ~712 GFLOP per training image
    assert mfu(516.0, train_flops, 989.0, devices=1) == pytest.approx(516 * train_flops / 989e12)
    assert mfu(8 * 516.0, train_flops, 989.0, devices=8) == pytest.approx(mfu(516.0, train_flops, 989.0, 1))
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0 and peak_tflops("cpu", "fp32") is None
