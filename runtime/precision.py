"""Mixed precision by config name: one mapping for training and sampling."""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast(device: torch.device, precision: str):
    """torch.autocast for bf16/fp16 on `device`; a no-op context for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
