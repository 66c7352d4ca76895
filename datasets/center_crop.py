"""ADM / DiT image preprocessing as pure functions on PIL images (spec section 6).

`to_rgb` turns any Pillow mode into RGB; `center_crop_arr` is the ADM crop: halve with a BOX
filter while the short side is at least twice the target, resize with BICUBIC so the short
side equals the target (the long side rounded), then cut the centre with floor offsets.
Images smaller than the crop go straight to the BICUBIC step, i.e. they are upscaled.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_WHITE = (255, 255, 255, 255)


def has_alpha(image: Image.Image) -> bool:
    """True for modes with an alpha band and for palette/RGB/L images with a transparency key."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of `image`; transparent pixels are composited on white.

    Grayscale (L, I, F), CMYK, YCbCr and opaque palette images use Pillow's own conversion,
    exactly like torchvision's ImageFolder loader that DiT uses. Images with transparency
    differ from that loader on purpose: `convert("RGB")` would drop the alpha band and expose
    whatever colour happens to sit under transparent pixels (often black), so we composite on
    white instead. ImageNet photos are opaque, so this choice does not change them.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop to `image_size` x `image_size` (spec section 6); keeps the image mode."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    # Repeated 2x BOX downsampling first: a cheap anti-aliased shrink before the final bicubic step.
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return Image.fromarray(pixels[top : top + image_size, left : left + image_size])
