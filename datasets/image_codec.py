"""The crops a cache stores for representation alignment: uint8 [C, H, W] <-> JPEG or PNG bytes.

One crop per item (the unflipped ADM centre crop the latent was encoded from); the reader flips it when it
draws the flipped latent, so both flips come from the one stored image. JPEG at quality 95 (4:4:4) was chosen
by measuring the encoder's tokens (scripts/jpeg_quality.py, docs/PERFORMANCE.md): their cosine to the lossless
crop's is 0.9987 on average with the demo's trained ViT (0.9959 at q90), at 41 dB PSNR on 256 px photo crops
and a third of PNG's size.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = ("jpeg", "png")


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 95) -> np.ndarray:
    """uint8 [C, H, W] (C = 1 or 3) -> the encoded bytes as a uint8 array (an HDF5 variable-length row)."""
    if fmt not in FORMATS:
        raise ValueError(f"extract.store_images={fmt!r} is not one of none, {', '.join(FORMATS)}")
    array = np.asarray(pixels, dtype=np.uint8)
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=int(quality), subsampling=0)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def decode_image(data: np.ndarray) -> np.ndarray:
    """Encoded bytes -> uint8 [C, H, W]."""
    with Image.open(io.BytesIO(np.asarray(data, dtype=np.uint8).tobytes())) as image:
        array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
