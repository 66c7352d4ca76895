"""Learning-rate schedule and EMA against closed forms."""
import math

import pytest
import torch

from runtime.ema import create_ema, update_ema
from runtime.lr_schedule import learning_rate


def test_warmup_then_constant():
    assert learning_rate(0, 1e-3, 10, "constant", 100) == pytest.approx(1e-4)
    assert learning_rate(9, 1e-3, 10, "constant", 100) == pytest.approx(1e-3)
    assert learning_rate(50, 1e-3, 10, "constant", 100) == 1e-3


def test_cosine_reaches_min_lr_and_halfway_value():
    assert learning_rate(10, 1.0, 10, "cosine", 110, 0.1) == pytest.approx(1.0)
    assert learning_rate(60, 1.0, 10, "cosine", 110, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(110, 1.0, 10, "cosine", 110, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        learning_rate(1, 1.0, 0, "step", 10)


def test_ema_update_matches_closed_form():
    model = torch.nn.Linear(3, 2)
    ema = create_ema(model)
    assert all(not p.requires_grad for p in ema.parameters())
    start = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, model, 0.9)
    for e, s, m in zip(ema.parameters(), start, model.parameters()):
        assert torch.allclose(e, 0.9 * s + 0.1 * m)
