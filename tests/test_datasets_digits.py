"""The scikit-learn digits demo source, re-derived from the raw 8x8 images."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from datasets.digits import DigitsSource


def test_digits_source_matches_an_independent_resize():
    source = DigitsSource(16)
    raw = load_digits()
    assert len(source) == 1797 and source.channels == 1
    assert source.class_names == [str(c) for c in range(10)]
    assert source.paths[5] == "digits/5"
    np.testing.assert_array_equal(source.labels, raw.target)
    for i in (0, 1000, 1796):
        grey = (raw.images[i] * 255 / 16).round().astype(np.uint8)
        assert grey.max() <= 255 and set(np.unique(raw.images[i])) <= set(range(17))
        expected = np.asarray(Image.fromarray(grey).resize((16, 16), Image.BICUBIC))
        index, image, error = source[i]
        assert index == i and error == "" and image.dtype == torch.uint8 and image.shape == (1, 16, 16)
        np.testing.assert_array_equal(image[0].numpy(), expected)


def test_digits_are_deterministic_and_sized():
    a, b = DigitsSource(32), DigitsSource(32)
    assert a[7][1].shape == (1, 32, 32)
    np.testing.assert_array_equal(a.images, b.images)
    white = DigitsSource(32).images.max()
    assert white == 255  # full ink maps to white before the resize rings


def test_too_small():
    with pytest.raises(ValueError, match="too small"):
        DigitsSource(4)
