"""Training data order: seeded, resumable from the step alone, independent of world size."""
import itertools

import pytest

from runtime.data_stream import StreamBatchSampler, mix_seed


def keys(sampler, batches):
    return list(itertools.islice(iter(sampler), batches))


def test_each_epoch_is_a_permutation_of_the_items():
    items = list(range(5, 25))
    sampler = StreamBatchSampler(items, seed=3, global_batch=4, grad_accum=1, rank=0, world_size=1)
    drawn = [k[0] for batch in keys(sampler, 10) for k in batch]  # 40 = 2 epochs
    assert sorted(drawn[:20]) == items and sorted(drawn[20:]) == items
    assert drawn[:20] != drawn[20:]  # reshuffled every epoch
    seeds = [k[1] for batch in keys(sampler, 10) for k in batch]
    assert len(set(seeds)) == 40  # every draw has its own seed


def test_resume_from_step_continues_the_same_stream():
    make = lambda start: StreamBatchSampler(range(17), 0, 6, 2, 0, 1, start_step=start)
    full = keys(make(0), 12)
    assert keys(make(3), 6) == full[6:12]  # 2 micro-batches per step


def test_ranks_partition_the_global_batch_whatever_the_world_size():
    one = keys(StreamBatchSampler(range(50), 1, 8, 1, 0, 1), 5)
    two = [keys(StreamBatchSampler(range(50), 1, 8, 1, r, 2), 5) for r in range(2)]
    four = [keys(StreamBatchSampler(range(50), 1, 8, 1, r, 4), 5) for r in range(4)]
    for step in range(5):
        assert sum((two[r][step] for r in range(2)), []) == one[step]
        assert sum((four[r][step] for r in range(4)), []) == one[step]


def test_indivisible_batch_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        StreamBatchSampler(range(10), 0, 6, 1, 0, 4)


def test_mix_seed_is_deterministic_and_spreads():
    assert mix_seed(1, 2) == mix_seed(1, 2)
    assert len({mix_seed(0, i) for i in range(1000)}) == 1000
    assert mix_seed(1, 2) != mix_seed(2, 1)
