"""Cache writing: fingerprints, atomic parts and files, settings checks, assembly of parts."""
import h5py
import numpy as np
import pytest

from runtime.atomic_file import remove_stale_temporaries
from datasets.cache_writer import (
    assemble_parts,
    check_settings,
    item_list_sha256,
    num_parts,
    part_path,
    part_range,
    read_manifest,
    read_part_errors,
    write_cache,
    write_manifest,
    write_part,
)
from datasets.latent_cache import LABELS, MOMENTS, PATHS, SKIPPED_PATHS, SKIPPED_REASONS

SHAPE = (1, 2, 2)
ATTRS = {
    "source": "test", "autoencoder": "identity", "scale_factor": 1.0, "image_size": 2, "latent_shape": list(SHAPE),
    "precision": "fp32", "item_list_sha256": "f", "num_listed": 7, "image_root": "",
}


def test_fingerprint_sees_order_labels_and_names():
    base = item_list_sha256("folder", ["a/1.png", "b/2.png"], [0, 1])
    assert base == item_list_sha256("folder", ["a/1.png", "b/2.png"], [0, 1])
    for other in (
        item_list_sha256("folder", ["b/2.png", "a/1.png"], [1, 0]),
        item_list_sha256("folder", ["a/1.png", "b/2.png"], [0, 0]),
        item_list_sha256("folder", ["a/1.png", "b/3.png"], [0, 1]),
        item_list_sha256("folder", ["a/1.png"], [0]),
        item_list_sha256("digits", ["a/1.png", "b/2.png"], [0, 1]),
    ):
        assert other != base


def test_settings_check_names_each_mismatch(tmp_path):
    expected = {"image_size": 32, "autoencoder": "identity", "item_list_sha256": "x", "latent_shape": [4, 4, 4]}
    check_settings(expected, {"image_size": np.int64(32), "latent_shape": np.array([4, 4, 4])}, tmp_path)
    check_settings(expected, {"unrelated": 1}, tmp_path)  # only shared keys are compared
    with pytest.raises(ValueError) as err:
        check_settings(expected, {"image_size": 16, "autoencoder": "other", "item_list_sha256": "y"}, tmp_path)
    message = str(err.value)
    assert "image_size 16 there vs 32 now" in message and "autoencoder 'other'" in message
    assert "list of images differs" in message and f"Delete {tmp_path}" in message and "data.cache_path" in message


def test_part_geometry():
    assert num_parts(4, 10) == 3 and list(part_range(2, 4, 10)) == [8, 9]
    assert num_parts(5, 10) == 2


def test_manifest_and_parts_are_written_atomically(tmp_path):
    folder = tmp_path / "x.parts"
    assert read_manifest(folder) is None
    write_manifest(folder, {"part_size": 4})
    assert read_manifest(folder) == {"part_size": 4}
    moments = np.arange(3 * 2 * 2 * 4, dtype=np.float16).reshape(3, 2, 2, *SHAPE)
    write_part(part_path(folder, 1), moments, ["", "bad", ""], first_item=4)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "part000001.h5"]
    assert read_part_errors(part_path(folder, 1), range(4, 7)) == ["", "bad", ""]
    with pytest.raises(ValueError, match="does not hold items"):
        read_part_errors(part_path(folder, 1), range(0, 3))
    (folder / ".part000002.h5.tmp-123").write_bytes(b"half")
    remove_stale_temporaries(folder)
    assert not (folder / ".part000002.h5.tmp-123").exists()


def test_assembly_keeps_order_and_drops_skipped_items(tmp_path):
    folder = tmp_path / "c.h5.parts"
    moments = np.random.default_rng(0).standard_normal((7, 2, 2, *SHAPE)).astype(np.float16)
    errors = ["", "", "OSError: broken", "", "", "", "ValueError: bad"]
    for part in range(num_parts(3, 7)):
        items = part_range(part, 3, 7)
        write_part(part_path(folder, part), moments[items.start : items.stop], errors[items.start : items.stop], items.start)
    paths = [f"c/{i}.png" for i in range(7)]
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    count, skipped = assemble_parts(tmp_path / "c.h5", folder, 3, paths, labels, ["a", "b", "c"], ATTRS)
    keep = [0, 1, 3, 4, 5]
    assert count == 5 and skipped == [("c/2.png", "OSError: broken"), ("c/6.png", "ValueError: bad")]
    with h5py.File(tmp_path / "c.h5") as handle:
        np.testing.assert_array_equal(handle[MOMENTS][()], moments[keep])
        np.testing.assert_array_equal(handle[LABELS][()], labels[keep])
        assert [p.decode() for p in handle[PATHS][()]] == [paths[i] for i in keep]
        assert [p.decode() for p in handle[SKIPPED_PATHS][()]] == ["c/2.png", "c/6.png"]
        assert [p.decode() for p in handle[SKIPPED_REASONS][()]] == ["OSError: broken", "ValueError: bad"]
        assert handle.attrs["complete"] and handle.attrs["num_items"] == 5 and handle.attrs["num_listed"] == 7


def test_failed_write_leaves_nothing_behind(tmp_path):
    blocks = [np.zeros((2, 2, 2, *SHAPE), np.float16)]
    with pytest.raises(ValueError, match="expected 3"):
        write_cache(tmp_path / "c.h5", blocks, np.zeros(3, np.int64), ["a", "b", "c"], ["k"], ATTRS)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="every listed image was skipped"):
        write_cache(tmp_path / "c.h5", [], np.zeros(0, np.int64), [], ["k"], ATTRS)
