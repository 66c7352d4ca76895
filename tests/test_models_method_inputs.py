"""The network inputs the other training methods add: DiT's latent code (DDGAN's generator) and extra
input channels (CLD's velocity), and the DDGAN discriminators."""
import pytest
import torch

from models import create_model
from models.discriminator import create_discriminator, discriminator_names
from models.flops import dit_forward_flops
from runtime.model_spec import check_same_model

REFERENCE_KEYS = set(create_model("DiT-T/4", input_size=8, in_channels=2, num_classes=3).state_dict())


def test_latent_code_changes_the_output_and_adds_no_reference_key_changes():
    torch.manual_seed(0)
    model = create_model("DiT-T/4", input_size=8, in_channels=2, num_classes=3, learn_sigma=False, z_dim=5).eval()
    for p in model.parameters():  # move off the adaLN-Zero start so the output depends on its inputs
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(4, 2, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 1, 2, 0])
    z = torch.randn(4, 5)
    out = model(x, t, y, z=z)
    assert out.shape == (4, 2, 8, 8)
    assert not torch.allclose(out, model(x, t, y, z=torch.randn(4, 5)))
    # z enters at unit RMS: rescaling it changes nothing
    torch.testing.assert_close(out, model(x, t, y, z=3.0 * z))
    extra = set(model.state_dict()) - REFERENCE_KEYS
    assert extra and all(k.startswith("z_embedder.") for k in extra)
    with pytest.raises(ValueError, match="latent code z must be given"):
        model(x, t, y)


def test_extra_input_channels_widen_the_input_only():
    model = create_model("DiT-T/4", input_size=8, in_channels=2, num_classes=3, learn_sigma=False, extra_in_channels=2)
    assert model(torch.randn(3, 4, 8, 8), torch.zeros(3), torch.zeros(3, dtype=torch.long)).shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match="DiT expects x of shape"):
        model(torch.randn(3, 2, 8, 8), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    base = {"name": "DiT-T/4", "input_size": 8, "in_channels": 2, "learn_sigma": False}
    assert dit_forward_flops({**base, "extra_in_channels": 2}) > dit_forward_flops(base)
    with pytest.raises(ValueError, match="extra_in_channels: 0 in ckpt, 2 now"):
        check_same_model({**base, "num_classes": 3}, {**base, "num_classes": 3, "extra_in_channels": 2}, "ckpt")


@pytest.mark.parametrize("name", ["D-T/4", "Conv-32"])
def test_discriminators_score_pairs_by_time_and_class(name):
    torch.manual_seed(0)
    d = create_discriminator(name, input_size=16, in_channels=1, num_classes=10)
    for p in d.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x_prev, x_t = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
    t, y = torch.full((4,), 500.0), torch.tensor([0, 1, 2, 3])
    logits = d(x_prev, x_t, t, y)
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    assert not torch.allclose(logits, d(x_prev, x_t, t + 250, y))
    assert not torch.allclose(logits, d(x_prev, x_t, t, (y + 1) % 10))
    assert not torch.allclose(logits, d(x_t, x_prev, t, y))
    # each pair is scored on its own (no batch statistics)
    torch.testing.assert_close(logits[:1], d(x_prev[:1], x_t[:1], t[:1], y[:1]))
    # R1 needs the input gradient of the gradient: double backward works
    real = x_prev.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(real, x_t, t, y).sum(), real, create_graph=True)
    grad.pow(2).sum().backward()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad and p.ndim > 1)


def test_unknown_discriminator_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown discriminator 'D-Q/2'.*D-S/2.*Conv-64"):
        create_discriminator("D-Q/2", 16, 1, 10)
    assert "Conv-32" in discriminator_names() and "D-XL/2" in discriminator_names()
