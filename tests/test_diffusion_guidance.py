"""Classifier-free guidance arithmetic (DiT convention) on a stub model."""
import pytest
import torch

from diffusion.guidance import guided_model_fn

NUM_CLASSES = 10


class StubModel:
    """Output channel k = x-dependent part + a label-dependent offset; records every call."""

    def __init__(self, out_channels):
        self.out_channels = out_channels
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        channel = torch.arange(self.out_channels, dtype=torch.float32).view(1, -1, 1, 1)
        base = x.mean(dim=1, keepdim=True) + 0.01 * t.float().view(-1, 1, 1, 1)
        return base + channel * (1.0 + y.float().view(-1, 1, 1, 1))


def _cond_uncond(model, x, t, y):
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, NUM_CLASSES))
    model.calls.clear()
    return cond, uncond


def test_scale_one_is_a_plain_conditional_forward():
    model = StubModel(8)
    x, t, y = torch.randn(3, 4, 2, 2), torch.tensor([5, 6, 7]), torch.tensor([1, 2, 3])
    out = guided_model_fn(model, y, 1.0, NUM_CLASSES)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 3
    assert torch.equal(out, model(x, t, y))


@pytest.mark.parametrize("all_channels", [False, True])
def test_one_batched_forward_and_guided_channels(all_channels):
    model = StubModel(8)  # 4 latent channels, learned sigma
    x, t, y = torch.randn(2, 4, 2, 2), torch.tensor([10, 20]), torch.tensor([3, 7])
    cond, uncond = _cond_uncond(model, x, t, y)
    out = guided_model_fn(model, y, 4.0, NUM_CLASSES, all_channels=all_channels)(x, t)

    assert len(model.calls) == 1
    x_in, t_in, y_in = model.calls[0]
    assert torch.equal(x_in, torch.cat([x, x])) and torch.equal(t_in, torch.cat([t, t]))
    assert torch.equal(y_in, torch.tensor([3, 7, NUM_CLASSES, NUM_CLASSES]))

    guided = 4 if all_channels else 3
    assert out.shape == (2, 8, 2, 2)
    expected_eps = uncond[:, :guided] + 4.0 * (cond[:, :guided] - uncond[:, :guided])
    assert torch.allclose(out[:, :guided], expected_eps)
    assert torch.equal(out[:, guided:], cond[:, guided:])  # rest of eps + all variance: conditional
    assert not torch.allclose(out[:, :guided], cond[:, :guided])


def test_few_latent_channels_never_guide_variance():
    model = StubModel(4)  # 2 latent channels, learned sigma: only eps channels 0-1 are guided
    x, t, y = torch.randn(2, 2, 2, 2), torch.tensor([1, 2]), torch.tensor([0, 1])
    cond, uncond = _cond_uncond(model, x, t, y)
    out = guided_model_fn(model, y, 2.0, NUM_CLASSES)(x, t)
    assert torch.allclose(out[:, :2], uncond[:, :2] + 2.0 * (cond[:, :2] - uncond[:, :2]))
    assert torch.equal(out[:, 2:], cond[:, 2:])


def test_equals_the_conditional_half_of_dit_forward_with_cfg():
    """DiT runs the doubled batch [z, z] and keeps the first half; we run B rows directly."""
    model = StubModel(8)
    x, t, y, scale = torch.randn(3, 4, 2, 2), torch.tensor([4, 8, 999]), torch.tensor([0, 5, 9]), 1.5
    # DiT's procedure as described in spec section 4, written out independently:
    z = torch.cat([x, torch.randn_like(x)])  # the second half's content is ignored by DiT
    half = z[:3]
    model_out = model(torch.cat([half, half]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NUM_CLASSES)]))
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = eps[:3], eps[3:]
    half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
    dit = torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)[:3]
    model.calls.clear()
    assert torch.allclose(guided_model_fn(model, y, scale, NUM_CLASSES)(x, t), dit)


def test_bad_labels():
    model = StubModel(8)
    with pytest.raises(ValueError, match="labels must lie"):
        guided_model_fn(model, torch.tensor([0, 11]), 4.0, NUM_CLASSES)
    with pytest.raises(ValueError, match="shape"):
        guided_model_fn(model, torch.zeros(2, 1, dtype=torch.long), 4.0, NUM_CLASSES)
    fn = guided_model_fn(model, torch.tensor([1, 2]), 4.0, NUM_CLASSES)
    with pytest.raises(ValueError, match="3 rows but 2 labels"):
        fn(torch.randn(3, 4, 2, 2), torch.tensor([1, 1, 1]))
