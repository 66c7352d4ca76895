"""Model FLOPs of DiT and LightningDiT from their architecture, and the dense peak of the device, for MFU.

MFU (model FLOPs utilisation, PaLM's definition) = model FLOPs per second / the device's peak:
only the FLOPs the model needs, not recomputation (gradient checkpointing) or padding. A DiT
forward pass costs, per image (multiply-accumulates; FLOPs = 2 x MACs), with N = (size/p)^2
tokens of width D over L blocks:

    per block: adaLN 6 D^2 + qkv 3 N D^2 + scores N^2 D + values N^2 D + proj N D^2 + MLP 2 r N D^2
    once:      patch embedding N p^2 C D, timestep MLP (256 D + D^2), final adaLN 2 D^2,
               final linear N D p^2 C_out

For DiT-XL/2 at 256 px that is 118.6 G MACs, the "Gflops" of the DiT paper's Table 4. A LightningDiT block
has 4 D^2 of adaLN without the shift, and SwiGLU's 3 N D h (h = int(2/3 x 4 D)) in place of the MLP; RMSNorm,
QK-norm and the rotary embedding are element-wise (not counted, as torch's counter does not). Training
costs three forward passes per image (forward, and a backward twice as expensive).
"""
from __future__ import annotations

from models import architecture, family_of
from models.dit import FREQUENCY_EMBEDDING_SIZE
from models.lightningdit import swiglu_hidden

MLP_RATIO = 4.0

# Dense (no sparsity) peak TFLOP/s by device name fragment and precision; fp32 training and sampling
# run with TF32 matmuls, so "fp32" is the TF32 peak. Vendors' data sheets (SXM/PCIe as named).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
}


def dit_forward_macs(model_args: dict) -> float:
    """Multiply-accumulates of one image's forward pass through the DiT of `model_args`."""
    name = model_args["name"]
    depth, width, _, patch = architecture(name)
    switches = family_of(name).switches(model_args)
    channels = int(model_args["in_channels"])
    out_channels = 2 * channels if model_args.get("learn_sigma", True) else channels
    tokens = (int(model_args["input_size"]) // patch) ** 2
    d = float(width)
    adaln = (6 if switches["adaln_shift"] else 4) * d * d
    mlp = 3 * tokens * d * swiglu_hidden(width, MLP_RATIO) if switches["swiglu"] else 2 * MLP_RATIO * tokens * d * d
    block = adaln + 3 * tokens * d * d + 2 * tokens * tokens * d + tokens * d * d + mlp
    in_channels = channels + int(model_args.get("extra_in_channels", 0))
    once = tokens * patch * patch * in_channels * d + FREQUENCY_EMBEDDING_SIZE * d + d * d + 2 * d * d
    once += tokens * d * patch * patch * out_channels
    for embedding in ("guidance_embedding", "interval_embedding"):  # the extra time-like inputs' MLPs
        if model_args.get(embedding):
            once += FREQUENCY_EMBEDDING_SIZE * d + d * d
    if model_args.get("z_dim"):
        once += int(model_args["z_dim"]) * d + d * d
    return depth * block + once


def dit_forward_flops(model_args: dict) -> float:
    return 2.0 * dit_forward_macs(model_args)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for `precision` (None when unknown: set train.peak_tflops)."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment.lower() in device_name.lower():
            return peaks[precision]
    return None


def mfu(images_per_second: float, flops_per_image: float, peak_tflops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak."""
    return images_per_second * flops_per_image / devices / (peak_tflops_per_device * 1e12)
