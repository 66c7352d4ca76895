"""Feature extraction: streaming over an .npz, the torch-fidelity Inception wrapper, weight resolution."""
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from metrics import features as features_module
from scripts.stand_ins import save_random_inception
from metrics.features import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    FeatureExtractor,
    Features,
    InceptionV3Compat,
    build_inception,
    cached_inception_path,
    extract_npz_features,
)


class ImageStats(FeatureExtractor):
    """Stand-in: per-channel means (pool), their negatives (logits); records the shapes it was given."""

    id = "image-stats"

    def __init__(self):
        self.shapes = []

    def __call__(self, images):
        self.shapes.append(tuple(images.shape))
        pool = images.double().mean(dim=(2, 3))
        return Features(pool=pool, logits=-pool)


def test_features_come_back_in_file_order_for_any_batch_size(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(11, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images)
    expected = images.reshape(11, -1, 3).mean(axis=1)
    for batch_size in (1, 4, 100):
        net = ImageStats()
        out = extract_npz_features(tmp_path / "s.npz", net, batch_size, show_progress=False)
        assert out.pool.dtype == np.float32 and out.spatial is None
        np.testing.assert_allclose(out.pool, expected, rtol=1e-6)
        np.testing.assert_allclose(out.logits, -expected, rtol=1e-6)
        assert net.shapes[0] == (min(batch_size, 11), 3, 4, 4)  # NCHW uint8 as torch-fidelity expects


def test_grayscale_is_replicated_to_rgb(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images)
    out = extract_npz_features(tmp_path / "g.npz", ImageStats(), 2, show_progress=False)
    np.testing.assert_allclose(out.pool, np.repeat(images.mean(axis=(1, 2)), 3, axis=1), rtol=1e-6)


def test_weights_location_matches_torch_fidelity():
    assert INCEPTION_URL == tf_inception.URL_INCEPTION_V3
    assert INCEPTION_URL.endswith("/" + INCEPTION_FILENAME)


def test_missing_weights_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        build_inception(tmp_path / "missing.pth")


def test_offline_without_weights_names_the_config_key(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(features_module, "cached_inception_path", lambda: tmp_path / "absent.pth")
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights=/path/to/" + INCEPTION_FILENAME):
        build_inception(None)


def test_weights_that_are_not_a_plain_state_dict_are_refused(tmp_path):
    torch.save({"model": Path("x")}, tmp_path / "pickled.pth")  # needs full unpickling
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        build_inception(tmp_path / "pickled.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="fc.weight"):
        build_inception(tmp_path / "other.pth")


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict for torch-fidelity's Inception with random weights (the real file is not available offline)."""
    return save_random_inception(tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME)


def test_inception_wrapper_outputs(random_inception_weights):
    net = build_inception(random_inception_weights, "cpu")
    assert isinstance(net, InceptionV3Compat) and "inception-v3-compat" in net.id
    captured = {}
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o.clone()))
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)  # one image: CPU Inception is slow
    out = net(images)
    assert out.pool.shape == (1, 2048) and out.logits.shape == (1, 1008) and out.spatial.shape == (1, 17 * 17 * 7)
    # IS logits exclude the classifier bias (ADM), which the fixture made non-zero.
    fc = net.net.fc
    torch.testing.assert_close(out.logits, out.pool @ fc.weight.T, rtol=1e-4, atol=1e-4)
    # sFID: first 7 channels of Mixed_6d's 1x1 branch (TF mixed_6/conv) on the 17x17 grid, NHWC order.
    assert captured["out"].shape == (1, 192, 17, 17)
    torch.testing.assert_close(out.spatial, captured["out"][:, :7].permute(0, 2, 3, 1).reshape(1, -1))
    assert net._spatial is None  # nothing kept between calls


def _real_weights():
    path = os.environ.get("INCEPTION_WEIGHTS")
    if path and Path(path).is_file():
        return Path(path)
    return cached_inception_path() if cached_inception_path().is_file() else None


@pytest.mark.skipif(
    _real_weights() is None,
    reason=f"no real Inception weights: set INCEPTION_WEIGHTS or put {INCEPTION_FILENAME} in the torch.hub cache",
)
def test_real_inception_weights():
    net = build_inception(_real_weights(), "cpu")
    images = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)
    images[1] = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    out = net(images)
    assert out.pool.shape == (2, 2048) and (out.pool >= 0).all()
    assert torch.isfinite(out.logits).all() and out.spatial.shape == (2, 2023)
    assert not torch.allclose(out.pool[0], out.pool[1])
