"""The crops a cache stores for representation alignment: stored beside the latents by extract, or added to a
finished cache without encoding again; each item's crop is the image its latent was encoded from, with the
same flip; both ways resume after a crash to the same file; a cache without crops is refused for REPA."""
import h5py
import numpy as np
import pytest
import torch

from datasets.digits import digits_images
from datasets.image_codec import decode_image, encode_image
from datasets.latent_cache import IMAGES, LatentDataset, read_cache_info
from phases import cache_images, extract
from runtime.config import load_config

pytestmark = pytest.mark.e2e

DIGITS = "configs/demo/digits.yaml"


def digits_cfg(path, *overrides):
    return load_config(DIGITS, [f"data.cache_path={path}", "extract.flush_every=2", *overrides])


def read_all(path):
    with h5py.File(path) as handle:
        return {name: handle[name][()] for name in handle}, dict(handle.attrs)


def assert_same_file(a, b):
    (da, attrs_a), (db, attrs_b) = read_all(a), read_all(b)
    assert da.keys() == db.keys()
    for name in da:
        if name == IMAGES:
            assert all(np.array_equal(x, y) for x, y in zip(da[name], db[name])), name
        else:
            np.testing.assert_array_equal(da[name], db[name], err_msg=name)
    assert {k: v for k, v in attrs_a.items() if k != "created"} .keys() == {k for k in attrs_b if k != "created"}


@pytest.fixture(scope="module")
def png_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("repa_data") / "digits.h5"
    extract.run(digits_cfg(path, "extract.store_images=png"))
    return path


def test_each_crop_is_the_image_of_its_latent_with_the_same_flip(png_cache):
    info = read_cache_info(png_cache)
    assert info["image_format"] == "png" and info["num_items"] == 1797
    pixels, _ = digits_images(16)
    dataset = LatentDataset(png_cache, random_flip=True, sample_posterior=False, images=True)
    flipped = 0
    for key in [(i, 100 + i) for i in range(0, 1797, 97)]:
        latent, label, crop = dataset[key]
        assert crop.dtype == torch.uint8 and crop.shape == (1, 16, 16)
        as_pixels = ((dataset.norm.denormalize(latent) + 1) * 127.5).round().clamp(0, 255)  # the identity's latent
        assert torch.equal(as_pixels.to(torch.uint8), crop)  # the very image the latent is, flip included
        flip = not torch.equal(crop[0], torch.from_numpy(pixels[key[0]]))
        if flip:
            assert torch.equal(crop[0], torch.from_numpy(pixels[key[0]][:, ::-1].copy()))
        flipped += flip
    assert 0 < flipped < 19  # both flips were drawn
    batch = dataset.__getitems__([(3, 1), (3, 1), (5, 2)])  # repeated rows in one gather
    assert torch.equal(batch[0][2], batch[1][2]) and len(batch[2]) == 3


def test_a_cache_without_crops_is_refused_for_alignment(digits_cache):
    with pytest.raises(ValueError, match="holds no images.*extract.store_images=jpeg"):
        LatentDataset(digits_cache, images=True)


def test_jpeg_crops_are_close_and_smaller():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    pixels = np.cumsum(pixels, axis=2).astype(np.uint8) // 2  # some structure
    png, jpeg = encode_image(pixels, "png"), encode_image(pixels, "jpeg", 95)
    assert np.array_equal(decode_image(png), pixels)  # lossless
    decoded = decode_image(jpeg)
    assert decoded.shape == pixels.shape and np.abs(decoded.astype(int) - pixels).mean() < 8
    with pytest.raises(ValueError, match="extract.store_images='webp'"):
        encode_image(pixels, "webp")


def crash_after(monkeypatch, module, parts):
    """Make `module`'s write_part raise after `parts` parts were written (a simulated kill)."""
    real, written = module.write_part, []

    def write(*args, **kwargs):
        if len(written) >= parts:
            raise KeyboardInterrupt("simulated crash")
        written.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_part", write)
    return written


def test_an_interrupted_extraction_with_crops_resumes_to_the_same_cache(png_cache, tmp_path, monkeypatch):
    target = tmp_path / "resumed.h5"
    crash_after(monkeypatch, extract, 1)
    with pytest.raises(KeyboardInterrupt):
        extract.run(digits_cfg(target, "extract.store_images=png"))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="not finished"):
        read_cache_info(target)
    with pytest.raises(ValueError, match="store_images"):  # the parts were made for png crops
        extract.run(digits_cfg(target, "extract.store_images=jpeg"))
    extract.run(digits_cfg(target, "extract.store_images=png"))
    assert_same_file(target, png_cache)


def test_crops_added_to_a_finished_cache_resume_and_keep_its_latents(digits_cache, png_cache, tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "added.h5"
    shutil.copy(digits_cache, target)
    before, _ = read_all(target)
    crash_after(monkeypatch, cache_images, 1)
    with pytest.raises(KeyboardInterrupt):
        extract.run(digits_cfg(target, "extract.store_images=png"))
    monkeypatch.undo()
    assert read_cache_info(target)["image_format"] is None  # the cache is untouched until the crops are all done
    assert len(list(cache_images.images_folder(target).glob("part*.h5"))) == 1
    written = crash_after(monkeypatch, cache_images, 100)
    extract.run(digits_cfg(target, "extract.store_images=png"))
    assert len(written) == 3  # 1797 items in 4 parts of 512: the first was kept
    after, _ = read_all(target)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)  # the latents as they were
    assert_same_file(target, png_cache)
    assert not cache_images.images_folder(target).exists()
