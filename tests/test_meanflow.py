"""MeanFlow's math (methods/meanflow.py): the JVP's total derivative, the identity's target against a closed form,
the adaptive weight, the (t, r) sampler, the zero-initialised interval embedding, and gradients averaged over
ranks as DDP would."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import env
from methods.meanflow import TimeSampling, adaptive_loss, average_velocity_and_target, interpolate
from models import create_model

ROOT = Path(__file__).resolve().parents[1]


def random_network():
    torch.manual_seed(0)
    model = create_model("DiT-T/4", input_size=8, in_channels=1, num_classes=3, interval_embedding=True).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_the_jvp_is_the_derivative_along_the_flow():
    """du/dt of u(z_t, r, t) with z_t moving along the path (dz/dt = v) and r fixed, against central differences."""
    model = random_network()
    x, noise = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    t, r = torch.tensor([0.7, 0.4, 0.9], dtype=torch.float64), torch.tensor([0.2, 0.4, 0.1], dtype=torch.float64)
    u_fn = lambda z, t_, h: model(z, t_, y, h=h)[:, :1]  # noqa: E731
    z, v = interpolate(x, noise, t)
    u, target = average_velocity_and_target(u_fn, z, t, t - r, v)
    delta = 1e-3  # the sinusoidal time features are float32: smaller steps drown in their rounding
    ahead, behind = interpolate(x, noise, t + delta)[0], interpolate(x, noise, t - delta)[0]
    with torch.no_grad():
        dudt = (u_fn(ahead, t + delta, t + delta - r) - u_fn(behind, t - delta, t - delta - r)) / (2 * delta)
        torch.testing.assert_close(u, u_fn(z, t, t - r))
    torch.testing.assert_close(target, v - (t - r).view(-1, 1, 1, 1) * dudt, rtol=1e-3, atol=1e-4)
    assert dudt.abs().max() > 1e-2  # a real derivative, not zeros


def test_the_identity_gives_the_exact_average_velocity_of_gaussian_data():
    """x ~ N(0, s^2), e ~ N(0, 1): z_t = z_r sigma(t) / sigma(r) with sigma(t)^2 = (1 - t)^2 s^2 + t^2, so the
    average velocity is z_t (1 - sigma(r) / sigma(t)) / (t - r) and the marginal velocity z_t sigma'(t) / sigma(t).
    The identity v - (t - r) du/dt, with the JVP along that velocity, must give back u."""
    s2 = 0.3

    def sigma(t):
        return torch.sqrt((1 - t) ** 2 * s2 + t**2)

    def velocity(z, t):
        return z * (t - (1 - t) * s2) / sigma(t) ** 2

    def exact_u(z, t, h):
        r = t - h
        ratio = (1 - sigma(r) / sigma(t)) / h
        return z * ratio.view(-1, 1)

    z = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.5, 0.99, 0.3], dtype=torch.float64)
    h = torch.tensor([0.5, 0.5, 0.1, 0.9, 0.25], dtype=torch.float64)
    v = velocity(z, t.view(-1, 1))
    u, target = average_velocity_and_target(exact_u, z, t, h, v)
    torch.testing.assert_close(target, u, rtol=1e-10, atol=1e-12)
    # ... and a wrong u (the instantaneous velocity) is not a fixed point
    _, wrong = average_velocity_and_target(lambda z_, t_, h_: velocity(z_, t_.view(-1, 1)), z, t, h, v)
    assert (wrong - v).abs().max() > 1e-2


def test_the_adaptive_weight():
    u = torch.tensor([[1.0, 2.0], [0.0, 0.5]], requires_grad=True)
    target = torch.zeros(2, 2)
    plain, error = adaptive_loss(u, target, p=0.0, eps=1e-3)
    torch.testing.assert_close(plain, torch.tensor([5.0, 0.25]))
    torch.testing.assert_close(error, torch.tensor([5.0, 0.25]))
    weighted, _ = adaptive_loss(u, target, p=1.0, eps=1e-3)
    torch.testing.assert_close(weighted, torch.tensor([5.0 / 5.001, 0.25 / 0.251]))
    weighted.sum().backward()  # the weight is detached: d/du = 2 u / (error + eps)^p
    torch.testing.assert_close(u.grad, 2 * u.detach() / torch.tensor([[5.001], [0.251]]))
    u.grad = None
    adaptive_loss(u, target, p=0.75, eps=1e-3)[0].sum().backward()
    torch.testing.assert_close(u.grad, 2 * u.detach() / torch.tensor([[5.001], [0.251]]) ** 0.75)


def test_the_time_sampler():
    g = torch.Generator().manual_seed(0)
    t, r = TimeSampling(t_mean=-0.4, t_std=1.0, r_mean=-0.4, r_std=1.0, ratio=0.25).draw(40_000, g)
    assert (t >= r).all() and t.min() > 0 and t.max() < 1
    assert abs((t != r).float().mean().item() - 0.25) < 0.01
    # t is the larger of the two logit-normal draws, whether r was kept or set to t
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.02  # E max of two N(m, 1) = m + 1/sqrt(pi)
    t, r = TimeSampling(t_mean=1.0, t_std=0.0, r_mean=-1.0, r_std=0.0, ratio=1.0).draw(10, g)
    torch.testing.assert_close(t, torch.full((10,), torch.sigmoid(torch.tensor(1.0)).item()))
    torch.testing.assert_close(r, torch.full((10,), torch.sigmoid(torch.tensor(-1.0)).item()))
    t, r = TimeSampling(ratio=0.0).draw(100, g)
    assert torch.equal(t, r)


def test_the_interval_embedding_starts_at_zero():
    """A flow or DiT model copied into a MeanFlow network gives its own outputs, whatever h."""
    torch.manual_seed(0)
    plain = create_model("DiT-T/4", input_size=8, in_channels=1, num_classes=3).eval()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.manual_seed(1)
    meanflow = create_model("DiT-T/4", input_size=8, in_channels=1, num_classes=3, interval_embedding=True).eval()
    meanflow.backbone.load_state_dict(plain.state_dict())
    assert any(k.startswith("interval_embedder.") for k in meanflow.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([0, 2])
    with torch.no_grad():
        for h in (torch.zeros(2), torch.tensor([0.3, 0.5])):
            torch.testing.assert_close(meanflow(x, t, y, h=h), plain(x, t, y))
    with pytest.raises(ValueError, match="the interval h = t - r must be given"):
        meanflow(x, t, y)


def test_two_processes_average_gradients_as_one_process_accumulates(tmp_path):
    """The JVP bypasses DDP; the loop's own reduction must give DDP's result: 2 ranks with one micro-batch each
    equal 1 process accumulating both (the same draws), to float32 round-off."""
    script = str(ROOT / "tests" / "functional_gradients.py")
    one = subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], env=env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                          str(tmp_path / "two.pt")], env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a.keys() == b.keys() and all(g is not None for g in a.values())
    assert any(g.abs().sum() > 0 for name, g in a.items() if name.startswith("interval_embedder."))
    for name, grad in a.items():
        torch.testing.assert_close(b[name], grad, rtol=1e-5, atol=1e-7, msg=name)
