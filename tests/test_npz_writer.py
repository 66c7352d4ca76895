"""Streaming .npz writer: identical content to numpy's own savez, readable by np.load."""
import numpy as np
import pytest

from phases.npz_writer import write_npz


def test_streamed_npz_equals_savez(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, size=10)
    path = write_npz(
        tmp_path / "s.npz",
        [
            ("arr_0", images.shape, np.uint8, (images[i : i + 3] for i in range(0, 10, 3))),
            ("arr_1", labels.shape, np.int64, [labels]),
        ],
    )
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], images)
        assert np.array_equal(data["arr_1"], labels)
    assert list(tmp_path.iterdir()) == [path]


def test_wrong_row_count_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="expected 5"):
        write_npz(tmp_path / "s.npz", [("arr_0", (5, 2), np.uint8, [np.zeros((3, 2), np.uint8)])])
    assert list(tmp_path.iterdir()) == []
