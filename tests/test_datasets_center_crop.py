"""ADM centre crop (spec section 6) against hand-computed pixels, and the RGB conversion rules."""
import numpy as np
import pytest
from PIL import Image

from datasets.center_crop import center_crop_arr, to_rgb


def test_box_halving_then_floor_offset_crop_by_hand():
    # 10x4 grey image made of 2x2 blocks whose BOX average is the integer target[r, c].
    target = np.array([[10, 20, 30, 40, 50], [60, 70, 80, 90, 100]], dtype=np.uint8)
    pixels = np.zeros((4, 10), dtype=np.uint8)
    for r in range(2):
        for c in range(5):
            v = int(target[r, c])
            pixels[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = [[v - 3, v + 3], [v + 1, v - 1]]
    out = np.asarray(center_crop_arr(Image.fromarray(pixels), 2))
    # short side 4 >= 2*2 -> one halving to 5x2; bicubic to short side 2 is a no-op;
    # left offset floor((5 - 2) / 2) = 1, top 0.
    np.testing.assert_array_equal(out, target[:, 1:3])


def test_halving_stops_below_twice_the_size():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    halved = img.resize((4, 4), Image.BOX)  # 8 >= 2*4: halved once, then already at size
    np.testing.assert_array_equal(np.asarray(center_crop_arr(img, 4)), np.asarray(halved))
    img7 = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
    direct = img7.resize((4, 4), Image.BICUBIC)  # 7 < 8: no halving, straight bicubic
    np.testing.assert_array_equal(np.asarray(center_crop_arr(img7, 4)), np.asarray(direct))


def test_long_side_rounding_and_centre_offsets():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # 300 wide, 200 high
    out = center_crop_arr(img, 64)
    # 200 >= 128: halve to 150x100; 100 < 128 stop; scale 0.64 -> 96x64; crop x from 16.
    expected = np.asarray(img.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC))[:, 16:80]
    assert out.size == (64, 64) and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_image_smaller_than_the_crop_is_upscaled():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8))  # 5 wide, 3 high
    out = center_crop_arr(img, 8)
    # scale 8/3: width round(13.33) = 13, crop x from floor(5/2) = 2
    expected = np.asarray(img.resize((13, 8), Image.BICUBIC))[:, 2:10]
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_tall_image_crops_vertically():
    img = Image.fromarray(np.arange(9 * 4, dtype=np.uint8).reshape(9, 4))  # 4 wide, 9 high
    out = np.asarray(center_crop_arr(img, 4))  # no resize needed: short side is 4
    np.testing.assert_array_equal(out, np.asarray(img)[2:6])  # top floor((9-4)/2) = 2


def test_invalid_size():
    with pytest.raises(ValueError, match="image_size"):
        center_crop_arr(Image.new("RGB", (4, 4)), 0)


def test_to_rgb_modes():
    grey = Image.fromarray(np.array([[0, 128], [200, 255]], dtype=np.uint8))
    rgb = np.asarray(to_rgb(grey))
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(rgb[..., 2], np.asarray(grey))

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red ink
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)

    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 200, 30)

    same = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(same) is same


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red stays red
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((2, 0)))

    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)

    keyed = Image.new("P", (2, 1))
    keyed.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    keyed.putpixel((0, 0), 0)
    keyed.putpixel((1, 0), 1)
    keyed.info["transparency"] = 0  # palette index 0 is transparent
    out = to_rgb(keyed)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)
