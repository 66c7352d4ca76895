"""The cache reader: metadata, flips, posterior draws, determinism, batched/worker/in-memory paths."""
import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.cache_writer import write_cache
from datasets.latent_cache import MOMENTS, LatentDataset, parts_folder, read_cache_info

SHAPE = (2, 3, 3)
SCALE = 0.5
N = 6


def make_cache(path, chunked=False):
    """Item i: flip 0 has mean +(i+1), std 0.5; flip 1 has mean -(i+1), std 0.25; label i % 3."""
    moments = np.zeros((N, 2, 2, *SHAPE), dtype=np.float16)
    for i in range(N):
        moments[i, 0, 0], moments[i, 0, 1] = i + 1, 0.5
        moments[i, 1, 0], moments[i, 1, 1] = -(i + 1), 0.25
    attrs = {
        "source": "test", "autoencoder": "identity", "scale_factor": SCALE, "image_size": 3,
        "latent_shape": list(SHAPE), "precision": "fp32", "item_list_sha256": "abc", "num_listed": N + 1,
        "image_root": "",
    }
    write_cache(path, [moments[:4], moments[4:]], np.arange(N) % 3, [f"x/{i}" for i in range(N)],
                ["a", "b", "c"], attrs, skipped_paths=["x/bad"], skipped_reasons=["broken"])
    if chunked:  # the reader's h5py fallback (not memory-mappable)
        with h5py.File(path, "r+") as handle:
            data = handle[MOMENTS][()]
            del handle[MOMENTS]
            handle.create_dataset(MOMENTS, data=data, chunks=(1, 2, 2, *SHAPE), compression="gzip")
    return moments


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache.h5"
    make_cache(path)
    return path


def test_info(cache):
    info = read_cache_info(cache)
    assert info["latent_shape"] == SHAPE and info["scale_factor"] == SCALE and info["num_items"] == N
    assert info["class_names"] == ["a", "b", "c"] and info["num_classes"] == 3 and info["num_skipped"] == 1
    assert info["format_version"] == 1 and info["autoencoder"] == "identity" and info["image_size"] == 3
    with h5py.File(cache) as handle:
        assert [s.decode() for s in handle["skipped_paths"][()]] == ["x/bad"]
        assert handle[MOMENTS].chunks is None  # contiguous: memory-mappable


def test_missing_and_unfinished_caches(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="-p extract"):
        read_cache_info(tmp_path / "nope.h5")
    parts_folder(tmp_path / "half.h5").mkdir()
    with pytest.raises(FileNotFoundError, match="not finished"):
        read_cache_info(tmp_path / "half.h5")
    with h5py.File(cache, "r+") as handle:
        handle.attrs["complete"] = False
    with pytest.raises(ValueError, match="unfinished"):
        read_cache_info(cache)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        read_cache_info(tmp_path / "junk.h5")


def test_mean_only_unflipped_is_exact(cache):
    ds = LatentDataset(cache, sample_posterior=False, random_flip=False)
    assert len(ds) == N
    for i in range(N):
        latent, label = ds[(i, 123)]
        assert latent.dtype == torch.float32 and latent.shape == SHAPE
        assert torch.equal(latent, torch.full(SHAPE, (i + 1) * SCALE))
        assert label.dtype == torch.int64 and int(label) == i % 3


def test_both_flips_appear_about_half_the_time(cache):
    ds = LatentDataset(cache, sample_posterior=False, random_flip=True)
    signs = torch.stack([ds[(2, seed)][0][0, 0, 0] for seed in range(400)]).sign()
    assert set(signs.tolist()) == {1.0, -1.0}
    assert abs(float((signs > 0).float().mean()) - 0.5) < 0.1  # 4 sigma of Binomial(400, 1/2)
    values = {round(float(ds[(2, s)][0][0, 0, 0]), 4) for s in range(20)}
    assert values == {1.5, -1.5}  # the flipped item's own mean, scaled


def test_posterior_draws_average_to_the_mean(cache):
    ds = LatentDataset(cache, sample_posterior=True, random_flip=False)
    n = 4000
    draws = torch.stack([x for x, _ in ds.__getitems__([(3, seed) for seed in range(n)])])
    mean, std = 4 * SCALE, 0.5 * SCALE
    assert abs(float(draws.mean()) - mean) < 4 * std / np.sqrt(n * 18) + 1e-4
    assert abs(float(draws.std()) - std) < 0.02 * std  # the stored std really is used
    assert draws[0].unique().numel() > 1  # independent noise per element


def test_keyed_draws_repeat_and_do_not_depend_on_the_batch(cache):
    ds = LatentDataset(cache)
    keys = [(0, 11), (5, 12), (0, 13), (5, 11)]
    batch = ds.__getitems__(keys)
    for key, (latent, label) in zip(keys, batch):
        again, label_again = ds[key]
        assert torch.equal(latent, again) and torch.equal(label, label_again)
    assert not torch.equal(batch[0][0], batch[2][0])  # another seed, another draw


def test_int_keys_use_the_global_rng(cache):
    ds = LatentDataset(cache)
    torch.manual_seed(0)
    first = ds[1][0]
    torch.manual_seed(0)
    assert torch.equal(ds[1][0], first)
    assert not torch.equal(ds[1][0], first)
    with pytest.raises(IndexError):
        ds[N]


def test_subset_in_memory_and_h5py_fallback_read_the_same(tmp_path, cache):
    subset = [4, 1, 1, 5]
    reference = LatentDataset(cache, indices=subset)
    assert len(reference) == 4
    assert [int(y) for _, y in reference.__getitems__(list(range(4)))] == [1, 1, 1, 2]
    keys = [(k, 100 + k) for k in range(4)]
    expected = torch.stack([x for x, _ in reference.__getitems__(keys)])
    chunked = tmp_path / "chunked.h5"
    make_cache(chunked, chunked=True)
    for other in (
        LatentDataset(cache, indices=subset, in_memory=True),
        LatentDataset(chunked, indices=subset),
        LatentDataset(chunked, indices=subset, in_memory=True),
    ):
        assert torch.equal(torch.stack([x for x, _ in other.__getitems__(keys)]), expected)
    assert not torch.equal(expected[1], expected[2])  # same item, other draw seed
    with pytest.raises(IndexError):
        LatentDataset(cache, indices=[0, N])


def test_dataloader_workers_batch_through_getitems(cache):
    ds = LatentDataset(cache)
    ds[0]  # opened in this process before the fork: workers must re-open their own
    batches = [[(i, 7 * i + j) for i in range(N)] for j in range(3)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2)
    for keys, (latents, labels) in zip(batches, loader):
        assert latents.shape == (N, *SHAPE) and labels.tolist() == [i % 3 for i in range(N)]
        assert torch.equal(latents, torch.stack([ds[k][0] for k in keys]))
    clone = pickle.loads(pickle.dumps(ds))  # spawn-style workers get no open file
    assert clone._array is None and torch.equal(clone[(2, 5)][0], ds[(2, 5)][0])
