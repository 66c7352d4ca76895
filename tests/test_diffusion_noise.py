"""Per-image noise: row i comes from generator i only."""
import pytest
import torch

from diffusion.noise import noise_like, per_row_noise


def test_rows_come_from_their_own_generator():
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    noise = per_row_noise((3, 2, 4, 4), gens, "cpu")
    for row, seed in zip(noise, (7, 8, 9)):
        assert torch.equal(row, torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(seed)))
    # the second draw continues each generator's own stream
    second = noise_like(noise, gens)
    assert torch.equal(second[1], torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(8))[1])


def test_default_and_bad_input():
    assert per_row_noise((2, 3), None, "cpu").shape == (2, 3)
    assert per_row_noise((2, 3), None, "cpu", torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        per_row_noise((3, 1), [torch.Generator(), torch.Generator()], "cpu")
