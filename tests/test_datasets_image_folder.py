"""ImageNet-style folder listing, decoding of mixed formats/modes, and the guard rails."""
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from datasets.center_crop import center_crop_arr
from datasets.image_folder import ImageFolderSource, scan_image_folder

CORRUPT = ["bee/broken.jpg", "bee/truncated.png"]
ROOT = Path(__file__).resolve().parents[1]


def _noise(rng, height, width, channels=3):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_image_folder(root: Path) -> Path:
    """Three classes, 23 listed files of mixed formats and modes (2 of them unreadable), plus files to ignore."""
    rng = np.random.default_rng(0)
    ant, bee, cat = (root / name for name in ("ant", "bee", "cat"))
    for folder in (ant, bee, cat, ant / "nested"):
        folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(rng, 30, 40)).save(ant / "a_rgb.jpg", quality=95)
    Image.fromarray(_noise(rng, 64, 48)).save(ant / "b_rgb.png")
    Image.fromarray(_noise(rng, 36, 36, 1)).save(ant / "c_grey.png")
    Image.fromarray(_noise(rng, 40, 50)).convert("CMYK").save(ant / "d_cmyk.jpg")
    Image.fromarray(_noise(rng, 33, 47)).quantize(16).save(ant / "e_palette.gif")
    rgba = np.concatenate([_noise(rng, 32, 32), np.zeros((32, 32, 1), np.uint8)], axis=2)
    rgba[8:24, 8:24, 3] = 255  # opaque centre, transparent border
    Image.fromarray(rgba, "RGBA").save(ant / "f_rgba.png")
    Image.fromarray(_noise(rng, 6, 9)).save(ant / "g_tiny.png")  # smaller than the 16 px crop
    Image.fromarray(_noise(rng, 20, 70)).save(ant / "nested" / "h.bmp")
    Image.fromarray(_noise(rng, 30, 30)).save(bee / "i.JPEG")
    Image.fromarray(np.stack([_noise(rng, 24, 24, 1), _noise(rng, 24, 24, 1)], 2), "LA").save(bee / "j_la.png")
    keyed = Image.fromarray(_noise(rng, 20, 28)).quantize(8)
    keyed.save(bee / "k_keyed.png", transparency=0)
    Image.fromarray(_noise(rng, 26, 26)).save(bee / "l.webp")
    Image.fromarray(_noise(rng, 40, 32)).save(bee / "m.tif")
    (bee / "broken.jpg").write_bytes(b"this is not an image")
    Image.fromarray(_noise(rng, 40, 40)).save(bee / "truncated.png")
    data = (bee / "truncated.png").read_bytes()
    (bee / "truncated.png").write_bytes(data[: len(data) // 2])
    for k in range(8):
        Image.fromarray(_noise(rng, 24 + 4 * k, 34 - 2 * k)).save(cat / f"n{k}.png")
    (bee / "notes.txt").write_text("not listed")
    Image.fromarray(_noise(rng, 8, 8)).save(cat / ".hidden.png")
    (root / "stray.jpg").write_bytes(b"files at the top level are not in a class")
    return root


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "images")


def test_listing_order_labels_and_ignored_files(folder):
    paths, labels, classes, skipped = scan_image_folder(folder)
    assert skipped == []
    assert classes == ["ant", "bee", "cat"]
    assert len(paths) == 23 and labels.dtype == np.int64
    assert paths[:8] == [
        "ant/a_rgb.jpg", "ant/b_rgb.png", "ant/c_grey.png", "ant/d_cmyk.jpg",
        "ant/e_palette.gif", "ant/f_rgba.png", "ant/g_tiny.png", "ant/nested/h.bmp",
    ]
    assert "bee/i.JPEG" in paths and "bee/notes.txt" not in paths and "cat/.hidden.png" not in paths
    assert [labels[paths.index(p)] for p in ("ant/a_rgb.jpg", "bee/m.tif", "cat/n7.png")] == [0, 1, 2]
    assert list(labels) == sorted(labels)  # grouped by class, in class order


def test_every_readable_image_decodes_to_the_crop(folder):
    source = ImageFolderSource(folder, 16)
    for i, path in enumerate(source.paths):
        index, image, error = source[i]
        assert index == i and image.shape == (3, 16, 16) and image.dtype == torch.uint8
        assert bool(error) == (path in CORRUPT), (path, error)
    index, image, error = source[source.paths.index("bee/broken.jpg")]
    assert "UnidentifiedImageError" in error and not image.any()
    assert "truncated" in source[source.paths.index("bee/truncated.png")][2]


def test_pixels_follow_rgb_conversion_then_adm_crop(folder):
    source = ImageFolderSource(folder, 16)
    _, image, _ = source[source.paths.index("ant/c_grey.png")]
    grey = Image.open(folder / "ant/c_grey.png")
    expected = np.asarray(center_crop_arr(grey, 16))  # crop of the grey image, then copied to 3 channels
    for channel in range(3):
        np.testing.assert_array_equal(image[channel].numpy(), expected)
    _, rgba, _ = source[source.paths.index("ant/f_rgba.png")]
    assert (rgba[:, 0, 0] == 255).all()  # transparent corner -> white
    _, tiny, _ = source[source.paths.index("ant/g_tiny.png")]
    expected = np.asarray(Image.open(folder / "ant/g_tiny.png").resize((24, 16), Image.BICUBIC))[:, 4:20]
    np.testing.assert_array_equal(tiny.permute(1, 2, 0).numpy(), expected)


def test_guard_rails(tmp_path):
    with pytest.raises(ValueError, match="image_root is not set"):
        scan_image_folder(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")
    (tmp_path / "sparse" / "full").mkdir(parents=True)
    (tmp_path / "sparse" / "empty").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "sparse" / "full" / "x.png")
    with pytest.raises(ValueError, match="contain no image files.*empty"):
        scan_image_folder(tmp_path / "sparse")


def test_links_are_followed_but_each_real_file_is_listed_once_and_keeps_its_class(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    for folder, names in ((root / "a", ["x.png", "y.png"]), (root / "b", ["v.png", "w.png"]), (outside, ["z.png"])):
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / name)
    (root / "a" / "loop").symlink_to(".")  # a link loop
    (root / "a" / "up").symlink_to("..")  # back to the root: would give b's images class a
    (root / "a" / "into_b").symlink_to("../b")
    (root / "a" / "w_of_b.png").symlink_to("../b/w.png")
    (root / "a" / "x_again.png").symlink_to("x.png")
    (root / "a" / "ext").symlink_to(outside)  # a linked folder outside the root is part of class a

    paths, labels, classes, skipped = scan_image_folder(root)
    assert classes == ["a", "b"]
    assert dict(zip(paths, labels.tolist())) == {"a/ext/z.png": 0, "a/x.png": 0, "a/y.png": 0, "b/v.png": 1, "b/w.png": 1}
    reasons = dict(skipped)
    assert reasons["a/loop/"].startswith("a link to a folder that is already listed")
    assert reasons["a/up/"] == "a link to the image root or a folder above it"
    assert reasons["a/into_b/"] == "a link into class folder 'b'"
    assert reasons["a/w_of_b.png"] == "a link to a file of class folder 'b'"
    assert reasons["a/x_again.png"] == "the same file as a/x.png"
    assert len(skipped) == 5


def test_what_the_scan_left_out_is_recorded_in_the_cache(tmp_path):
    from datasets.latent_cache import SKIPPED_PATHS, SKIPPED_REASONS
    from phases import extract
    from runtime.config import load_config

    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "one.png")
    (root / "a" / "loop").symlink_to(".")
    cache = tmp_path / "cache.h5"
    extract.run(load_config(ROOT / "configs/demo/digits.yaml", [
        "data.source=folder", f"data.image_root={root}", f"data.cache_path={cache}", "data.image_size=8"]))
    with h5py.File(cache) as handle:
        assert [p.decode() for p in handle[SKIPPED_PATHS][:]] == ["a/loop/"]
        assert handle[SKIPPED_REASONS][0].decode().startswith("a link to a folder that is already listed")
        assert len(handle["labels"]) == 2
