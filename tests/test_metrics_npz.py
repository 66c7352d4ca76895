"""Reading ADM-format .npz files: streamed images, labels, stored statistics, clear errors."""
import numpy as np
import pytest

from metrics.npz import inspect_npz, iter_image_batches, read_labels, read_statistics


def _images(n=7, size=5, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_images_stream_in_order_in_batches(tmp_path, save):
    images, labels = _images(), np.arange(7) % 3
    path = tmp_path / "samples.npz"
    save(path, images, labels)
    contents = inspect_npz(path)
    assert contents.num_images == 7 and contents.images.shape == (7, 5, 5, 3)
    assert contents.has_labels and not contents.has_statistics
    batches = list(iter_image_batches(path, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert all(b.dtype == np.uint8 and b.flags.writeable for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(read_labels(path), labels)


def test_statistics_only_file(tmp_path):
    path = tmp_path / "stats.npz"
    mu, sigma = np.arange(3, dtype=np.float32), np.eye(3, dtype=np.float32)
    np.savez(path, mu=mu, sigma=sigma)
    contents = inspect_npz(path)
    assert contents.images is None and contents.num_images == 0 and contents.has_statistics
    assert not contents.has_spatial_statistics and read_labels(path) is None
    stats = read_statistics(path)
    assert set(stats) == {"mu", "sigma"} and stats["mu"].dtype == np.float64
    np.testing.assert_array_equal(stats["sigma"], sigma)


def test_adm_reference_layout_with_images_and_both_statistics(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=_images(), mu=np.zeros(4), sigma=np.eye(4), mu_s=np.ones(2), sigma_s=2 * np.eye(2))
    contents = inspect_npz(path)
    assert contents.num_images == 7 and contents.has_statistics and contents.has_spatial_statistics
    assert not contents.has_labels
    stats = read_statistics(path)
    np.testing.assert_array_equal(stats["sigma_s"], 2 * np.eye(2))


def test_grayscale_images_are_accepted(tmp_path):
    path = tmp_path / "gray.npz"
    np.savez(path, _images(channels=1))
    assert inspect_npz(path).images.shape[-1] == 1


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"arr_0": _images().astype(np.float32)}, "uint8"),
        ({"arr_0": _images().transpose(0, 3, 1, 2).copy()}, "NHWC"),
        ({"arr_0": _images()[0]}, "NHWC"),
        ({"arr_0": _images(channels=4)}, "NHWC"),
        ({"arr_0": _images(n=0)}, "no images"),
        ({"arr_0": _images(), "arr_1": np.zeros(3)}, "labels"),
        ({"mu": np.zeros(3)}, "mu/sigma"),
        ({"other": np.zeros(3)}, "neither"),
    ],
)
def test_malformed_files_raise_clear_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        inspect_npz(path)


def test_statistics_with_wrong_shapes_raise(tmp_path):
    path = tmp_path / "bad_stats.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="sigma"):
        read_statistics(path)


def test_missing_and_non_npz_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        inspect_npz(tmp_path / "missing.npz")
    np.save(tmp_path / "plain.npy", _images())
    with pytest.raises(ValueError, match="not an .npz"):
        inspect_npz(tmp_path / "plain.npy")
    path = tmp_path / "ok.npz"
    np.savez(path, _images())
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_image_batches(path, 0))
