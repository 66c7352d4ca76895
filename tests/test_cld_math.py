"""CLD math (diffusion/cld.py, diffusion/cld_samplers.py): kernel, HSM target and samplers.

Statistical checks use seeded draws and tolerances of Z_TOL standard errors computed from the
sample size; exact checks use float64 and independent references (matrix exponentials,
autograd). On Gaussian data the marginal p_t(u) is Gaussian, so the exact score is known and
each sampler's output moments can be computed without sampling (diffusion/cld_gaussian.py).
"""
import math

import pytest
import torch

from diffusion.cld import CLD
from diffusion.cld_gaussian import GaussianData, exact_score, moment_error, output_moments
from diffusion.cld_samplers import euler_maruyama_sample, probability_flow_sample, sde_time_grid, sscs_sample
from diffusion.noise import per_row_noise

F64 = torch.float64
Z_TOL = 5.0  # statistical tolerance in standard errors: a false alarm has probability < 1e-6 per check

# Gaussian data per dimension: x0_d ~ N(DATA_MEAN_d, DATA_STD_d^2)
DATA_MEAN = torch.tensor([-1.0, 0.5, 2.0], dtype=F64)
DATA_STD = torch.tensor([0.5, 1.0, 1.5], dtype=F64)
DATA = GaussianData(DATA_MEAN, DATA_STD)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tests run many tiny ops, where thread hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _times(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _exact_transition(cld: CLD, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Phi, Sigma_rest) of the forward SDE over [0, t] by Van Loan's matrix exponential.

    exp([[-A, D], [0, A^T]] t) = [[., F12], [0, F22]] gives Phi = F22^T and the covariance
    injected from a fixed start, Phi F12: a reference independent of the closed form.
    """
    m_inv, gam, beta = 1.0 / cld.mass, cld.damping, cld.beta
    a = beta * torch.tensor([[0.0, m_inv], [-1.0, -gam * m_inv]], dtype=F64)
    d = torch.tensor([[0.0, 0.0], [0.0, 2.0 * gam * beta]], dtype=F64)
    block = torch.zeros(4, 4, dtype=F64)
    block[:2, :2], block[:2, 2:], block[2:, 2:] = -a, d, a.T
    f = torch.linalg.matrix_exp(block * t)
    phi = f[2:, 2:].T
    return phi, phi @ f[:2, 2:]


def _gaussian_data_score(cld: CLD, means=None):
    """The exact score for DATA (diffusion/cld_gaussian.py)."""
    return exact_score(cld, DATA, means)


def _output_moments(cld: CLD, sampler, steps: int, draws_per_step: int = 4, data=None):
    return output_moments(cld, data or DATA, sampler, steps, draws_per_step)


def _moment_error(mean: torch.Tensor, var: torch.Tensor, target: tuple | None = None, data=None) -> float:
    return moment_error(data or DATA, mean, var, target)


def _assert_recovers_data(samples: torch.Tensor, what: str) -> None:
    """Sample mean and variance within Z_TOL standard errors of the data's (Gaussian: SE(var) = s^2 sqrt(2/(n-1)))."""
    n = samples.shape[0]
    samples = samples.to(F64)
    mean_z = (samples.mean(0) - DATA_MEAN) / (DATA_STD / math.sqrt(n))
    var_z = (samples.var(0) - DATA_STD**2) / (DATA_STD**2 * math.sqrt(2.0 / (n - 1)))
    assert mean_z.abs().max() < Z_TOL, f"{what}: mean off by {mean_z.tolist()} standard errors"
    assert var_z.abs().max() < Z_TOL, f"{what}: variance off by {var_z.tolist()} standard errors"


def _prior(cld: CLD, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(DATA_MEAN), generator=g, dtype=F64)
    v = torch.randn(n, len(DATA_MEAN), generator=g, dtype=F64) * math.sqrt(cld.mass)
    return x, v


def _seeded_noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(tuple(shape), generator=g, dtype=F64)


# ---------------------------------------------------------------------------------------------
# 1-3. The perturbation kernel


def test_kernel_matches_monte_carlo_of_the_forward_sde():
    """Mean and covariance of p(u_t | x_0) against Euler-Maruyama paths of the SDE itself.

    dt = 5e-5 keeps the scheme's O(dt/t) bias (0.5% at t = 0.01) well below Z_TOL standard
    errors (5 sqrt(2/30000) = 4% on variances).
    """
    cld = CLD()
    torch.manual_seed(0)
    per_x0, dt = 10_000, 5e-5
    x0 = torch.tensor([-1.5, 0.3, 2.0], dtype=F64).repeat_interleave(per_x0)
    n = x0.numel()
    x = x0.clone()
    v = torch.randn(n, dtype=F64) * math.sqrt(cld.gamma * cld.mass)
    m_inv, gam, beta = 1.0 / cld.mass, cld.damping, cld.beta
    checkpoints = {200: 0.01, 2000: 0.1, 10_000: 0.5}
    for step in range(1, max(checkpoints) + 1):
        z = torch.randn(n, dtype=F64)
        x, v = x + beta * m_inv * v * dt, v + (-beta * x - beta * gam * m_inv * v) * dt + math.sqrt(2 * gam * beta * dt) * z
        if step not in checkpoints:
            continue
        t = _times(checkpoints[step])
        s_xx, s_xv, s_vv = (c.item() for c in cld.covariance(t))
        mu_x, mu_v = cld.mean(x0, t.expand(n))
        dx, dv = x - mu_x, v - mu_v  # residuals from the exact mean: their covariance is Sigma_t
        for group in range(3):
            rows = slice(group * per_x0, (group + 1) * per_x0)
            assert abs(dx[rows].mean().item()) < Z_TOL * math.sqrt(s_xx / per_x0), f"mean x at t={t.item()}"
            assert abs(dv[rows].mean().item()) < Z_TOL * math.sqrt(s_vv / per_x0), f"mean v at t={t.item()}"
        assert abs((dx * dx).mean().item() - s_xx) < Z_TOL * s_xx * math.sqrt(2.0 / n), f"Sxx at t={t.item()}"
        assert abs((dv * dv).mean().item() - s_vv) < Z_TOL * s_vv * math.sqrt(2.0 / n), f"Svv at t={t.item()}"
        se_xv = math.sqrt((s_xx * s_vv + s_xv**2) / n)
        assert abs((dx * dv).mean().item() - s_xv) < Z_TOL * se_xv, f"Sxv at t={t.item()}"


def test_closed_form_equals_the_matrix_exponential_solution():
    """Mean coefficients and covariance equal Phi (1, 0)^T and Sigma_rest + Phi diag(0, gamma M) Phi^T."""
    cld = CLD(numerical_eps=0.0)
    for t in (1e-5, 1e-3, 0.02, 0.1, 0.37, 1.0):
        phi, rest = _exact_transition(cld, t)
        reference = rest + phi @ torch.diag(torch.tensor([0.0, cld.gamma * cld.mass], dtype=F64)) @ phi.T
        a_x, a_v = cld.mean_coefficients(_times(t))
        s_xx, s_xv, s_vv = cld.covariance(_times(t))
        assert torch.allclose(torch.cat([a_x, a_v]), phi[:, 0], rtol=1e-10, atol=1e-14)
        got = torch.tensor([[s_xx.item(), s_xv.item()], [s_xv.item(), s_vv.item()]], dtype=F64)
        # for t <= 1 matrix_exp is accurate to a few 1e-13 in absolute terms, hence atol
        assert torch.allclose(got, reference, rtol=1e-8, atol=1e-12), (t, got, reference)


def test_kernel_limits_at_zero_and_at_equilibrium():
    """t -> 0: mean (x0, 0), covariance diag(0, gamma M) (+ numerical_eps); t -> inf: N(0, diag(1, M))."""
    exact = CLD(numerical_eps=0.0)
    zero = _times(0.0)
    assert [c.item() for c in exact.mean_coefficients(zero)] == [1.0, 0.0]
    assert [c.item() for c in exact.covariance(zero)] == [0.0, 0.0, exact.gamma * exact.mass]
    # first order in t: x_t - x_0 ~ beta M^-1 v_0 t, v_t ~ v_0, so Sxx ~ (beta t / M)^2 gamma M, Sxv ~ (beta t / M) gamma M
    t, var_v0 = 1e-9, exact.gamma * exact.mass
    s_xx, s_xv, s_vv = (c.item() for c in exact.covariance(_times(t)))
    assert s_xx == pytest.approx((exact.beta * t / exact.mass) ** 2 * var_v0, rel=1e-6)
    assert s_xv == pytest.approx(exact.beta * t / exact.mass * var_v0, rel=1e-6)
    assert s_vv == pytest.approx(var_v0, rel=1e-6)

    cld = CLD()
    s_xx, s_xv, s_vv = (c.item() for c in cld.covariance(zero))
    assert (s_xx, s_xv) == (cld.numerical_eps, 0.0)
    assert s_vv == pytest.approx(cld.gamma * cld.mass + cld.numerical_eps, rel=1e-15)

    late = _times(10.0, 30.0)  # e^(-2 beta t / Gamma) < 1e-34: the transient is below float64 precision
    a_x, a_v = exact.mean_coefficients(late)
    s_xx, s_xv, s_vv = exact.covariance(late)
    assert a_x.abs().max() < 1e-30 and a_v.abs().max() < 1e-30
    assert torch.allclose(s_xx, torch.ones(2, dtype=F64), atol=1e-14) and s_xv.abs().max() < 1e-30
    assert torch.allclose(s_vv, torch.full((2,), exact.mass, dtype=F64), atol=1e-14)
    assert exact.damping**2 == pytest.approx(4 * exact.mass)


def test_covariance_is_positive_definite_from_training_eps_to_one():
    cld = CLD()
    t = torch.cat([torch.logspace(math.log10(cld.eps), 0.0, 4001, dtype=F64), torch.linspace(cld.eps, 1.0, 4001, dtype=F64)])
    s_xx, s_xv, s_vv = cld.covariance(t)
    assert torch.all(s_xx > 0) and torch.all(s_vv > 0)
    assert torch.all(s_xx * s_vv - s_xv**2 > 0)
    l11, l21, l22 = cld.cholesky(t)
    assert torch.all(torch.isfinite(l21)) and torch.all(l11 > 0) and torch.all(l22 > 0)
    assert torch.allclose(cld.ell(t), torch.sqrt(s_xx / (s_xx * s_vv - s_xv**2)), rtol=1e-10)


@pytest.mark.parametrize("t", [1e-5, 0.05, 0.6])
def test_perturb_draws_from_the_kernel(t):
    """perturb's Cholesky draws have mean mu_t(x0) and covariance Sigma_t (Z_TOL standard errors)."""
    cld = CLD()
    n = 200_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 1), 0.8, dtype=F64)
    times = torch.full((n,), t, dtype=F64)
    x_t, v_t = cld.perturb(x0, times, torch.randn(n, 1, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64))
    mu_x, mu_v = cld.mean(x0, times)
    s_xx, s_xv, s_vv = (c.item() for c in cld.covariance(_times(t)))
    dx, dv = (x_t - mu_x).flatten(), (v_t - mu_v).flatten()
    assert abs(dx.mean().item()) < Z_TOL * math.sqrt(s_xx / n) and abs(dv.mean().item()) < Z_TOL * math.sqrt(s_vv / n)
    assert abs(dx.var().item() - s_xx) < Z_TOL * s_xx * math.sqrt(2.0 / n)
    assert abs(dv.var().item() - s_vv) < Z_TOL * s_vv * math.sqrt(2.0 / n)
    assert abs((dx * dv).mean().item() - s_xv) < Z_TOL * math.sqrt((s_xx * s_vv + s_xv**2) / n)


# ---------------------------------------------------------------------------------------------
# 4. HSM


def test_hsm_target_is_the_autograd_velocity_score_of_the_kernel():
    """-ell_t eps_v = grad_v log N(u_t; mu_t, Sigma_t), including at t = eps where Sigma_t is near-singular."""
    cld = CLD()
    g = torch.Generator().manual_seed(2)
    t = torch.cat([_times(cld.eps, 1e-3), torch.rand(6, generator=g, dtype=F64)])
    x0 = torch.randn(len(t), 3, 4, generator=g, dtype=F64)
    noise_x, noise_v = torch.randn_like(x0), torch.randn_like(x0)
    x_t, v_t = cld.perturb(x0, t, noise_x, noise_v)
    v_t.requires_grad_(True)
    mu_x, mu_v = cld.mean(x0, t)
    s_xx, s_xv, s_vv = (c.view(-1, 1, 1) for c in cld.covariance(t))
    dx, dv = x_t - mu_x, v_t - mu_v
    det = s_xx * s_vv - s_xv**2
    log_density = -0.5 * (s_vv * dx * dx - 2 * s_xv * dx * dv + s_xx * dv * dv) / det - 0.5 * torch.log(det)
    (grad_v,) = torch.autograd.grad(log_density.sum(), v_t)
    target = -cld.ell(t).view(-1, 1, 1) * noise_v
    assert torch.allclose(grad_v, target, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mixed_score", [True, False])
def test_hsm_loss_is_the_eps_v_regression_and_its_minimiser_gives_the_target(mixed_score):
    """The output that zeroes the loss maps to the score -ell eps_v; away from it the loss is mean (delta^2)."""
    cld = CLD(mixed_score=mixed_score)
    g = torch.Generator().manual_seed(3)
    t = cld.eps + (1 - cld.eps) * torch.rand(5, generator=g, dtype=F64)
    x0 = torch.randn(5, 2, 3, generator=g, dtype=F64)
    noise_x, noise_v = torch.randn_like(x0), torch.randn_like(x0)
    x_t, v_t = cld.perturb(x0, t, noise_x, noise_v)
    analytic = v_t / (cld.ell(t) * cld.covariance(t)[2]).view(-1, 1, 1) if mixed_score else 0.0
    best = noise_v - analytic
    assert torch.allclose(cld.velocity_score(best, x_t, v_t, t), -cld.ell(t).view(-1, 1, 1) * noise_v, rtol=1e-9, atol=1e-9)
    assert cld.hsm_loss(best, x_t, v_t, noise_v, t).abs().max() < 1e-10
    delta = torch.randn(x0.shape, generator=g, dtype=F64)
    loss = cld.hsm_loss(best + delta, x_t, v_t, noise_v, t)
    assert loss.shape == (5,) and loss.dtype == torch.float32
    assert torch.allclose(loss.double(), delta.pow(2).flatten(1).mean(1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 5. Samplers on Gaussian data with the exact score


def test_sscs_error_shrinks_with_steps_and_beats_euler_maruyama():
    """Exact output moments: SSCS improves 20 -> 50 -> 200 steps at (at least) first order and is
    more accurate than Euler-Maruyama at the same small step counts."""
    cld = CLD()
    sscs = {n: _moment_error(*_output_moments(cld, sscs_sample, n)) for n in (20, 50, 200)}
    em = {n: _moment_error(*_output_moments(cld, euler_maruyama_sample, n)) for n in (20, 50)}
    assert sscs[20] > sscs[50] > sscs[200]
    assert sscs[200] < 0.35 * sscs[50], sscs  # first order would give 50/200 = 0.25
    assert sscs[20] < em[20] and sscs[50] < em[50], (sscs, em)


def test_sscs_samples_recover_gaussian_data():
    """4000 draws at 200 steps: mean and variance within Z_TOL standard errors of the data."""
    cld = CLD()
    x, v = _prior(cld, 4000, seed=4)
    out, _ = sscs_sample(cld, _gaussian_data_score(cld), x, v, 200, _seeded_noise(5))
    _assert_recovers_data(out, "sscs-200")


def test_quadratic_striding_is_the_official_grid():
    """CLD-SGM's `striding: quadratic` in reverse time r = 1 - t: r_k = (1 - eps)(1 - (1 - k/n)^2), n = steps - 1."""
    cld = CLD()
    steps, end = 11, 1.0 - cld.sampling_eps
    grid = sde_time_grid(cld, steps, striding="quadratic")
    k = torch.arange(steps, dtype=F64) / (steps - 1)
    torch.testing.assert_close(grid, 1.0 - end * (1.0 - (1.0 - k) ** 2), rtol=0, atol=1e-15)
    assert grid[0] == 1.0 and abs(grid[-1].item() - cld.sampling_eps) < 1e-15
    gaps = grid[:-1] - grid[1:]
    assert torch.all(gaps[1:] < gaps[:-1]) and abs(gaps[-1].item() - end / (steps - 1) ** 2) < 1e-15
    with pytest.raises(ValueError, match="striding"):
        sde_time_grid(cld, steps, striding="cubic")


def test_quadratic_striding_tames_the_stiff_end_on_image_like_data():
    """Narrow per-pixel data (std 0.05..0.4, as pixels given their class): near t = eps the velocity score is
    about -v / (gamma M) = -100 v, and the score step of SSCS (and all of Euler-Maruyama) is explicit, so a
    linear grid's last steps of 1/24 overshoot. The official quadratic grid ends in steps of 1/24^2: at 25
    score evaluations SSCS's moment error falls more than 20-fold, and SSCS then beats Euler-Maruyama."""
    narrow = GaussianData.of([0.0, -0.5, 0.5], [0.05, 0.2, 0.4])
    cld = CLD()

    def error(sampler, striding):
        run = lambda c, score, x, v, steps, noise: sampler(c, score, x, v, steps, noise, striding=striding)
        return _moment_error(*_output_moments(cld, run, 25, data=narrow), data=narrow)

    linear, quadratic = error(sscs_sample, "linear"), error(sscs_sample, "quadratic")
    assert quadratic < linear / 20, (linear, quadratic)
    assert quadratic < error(euler_maruyama_sample, "quadratic") / 1.5


@pytest.mark.parametrize("solver, steps", [("rk4", 100), ("adaptive", None)])
def test_probability_flow_maps_the_prior_to_gaussian_data(solver, steps):
    cld = CLD()
    x, v = _prior(cld, 4000, seed=6)
    out, _ = probability_flow_sample(cld, _gaussian_data_score(cld), x, v, steps, solver=solver)
    _assert_recovers_data(out, f"ode-{solver}")


def test_fixed_step_ode_solvers_are_ordered_by_accuracy():
    """Exact output moments at 100 steps: Euler (order 1) > Heun (2) > RK4 (4) in error.

    The error is measured against RK4 at 800 steps, the ODE's own limit: against the data it would
    also contain the prior's mismatch with p_1 (mean ~ 3e-3 x0 at t = 1), which hides RK4's error.
    """
    cld = CLD()

    def ode(solver):
        return lambda c, score, x, v, steps, noise: probability_flow_sample(c, score, x, v, steps, noise, solver=solver)

    limit = _output_moments(cld, ode("rk4"), 800, draws_per_step=0)
    errors = [_moment_error(*_output_moments(cld, ode(s), 100, draws_per_step=0), limit) for s in ("euler", "heun", "rk4")]
    assert errors[0] > errors[1] > errors[2], errors


def test_adaptive_solver_error_follows_its_tolerance():
    """Against RK4 at 1000 steps (4th order: its own error is far below both), 100x tighter rtol/atol
    cut the adaptive solver's global error at least 10x."""
    cld = CLD()
    score = _gaussian_data_score(cld)
    x, v = _prior(cld, 64, seed=13)
    reference, _ = probability_flow_sample(cld, score, x, v, 1000, solver="rk4")
    errors = []
    for tol in (1e-4, 1e-6):
        out, _ = probability_flow_sample(cld, score, x, v, solver="adaptive", rtol=tol, atol=tol)
        errors.append((out - reference).abs().max().item())
    assert errors[1] < errors[0] / 10, errors


def test_adaptive_solver_is_per_sample():
    """A row's result is the same alone as in a batch whose other rows need different step sizes."""
    cld = CLD()
    score = _gaussian_data_score(cld)
    x, v = _prior(cld, 6, seed=7)
    x[0] *= 4.0  # a far-out row takes other steps than its neighbours
    batch, _ = probability_flow_sample(cld, score, x, v, solver="adaptive")
    for row in (0, 3):
        alone, _ = probability_flow_sample(cld, score, x[row : row + 1], v[row : row + 1], solver="adaptive")
        assert torch.equal(alone[0], batch[row])


def test_adaptive_solver_tells_a_conditional_score_which_rows_it_sees():
    cld = CLD()
    means = torch.tensor([-2.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    x, v = _prior(cld, 4, seed=3)
    x[1] *= 5.0  # finishes later than the others: the last calls see a subset of the rows
    batch, _ = probability_flow_sample(cld, _gaussian_data_score(cld, means), x, v, solver="adaptive")
    for row in range(4):
        alone, _ = probability_flow_sample(cld, _gaussian_data_score(cld, means[row : row + 1]), x[row : row + 1],
                                           v[row : row + 1], solver="adaptive")
        assert torch.equal(alone[0], batch[row])


def test_samplers_are_independent_of_the_batch_with_per_row_generators():
    cld = CLD()
    score = _gaussian_data_score(cld)
    x, v = _prior(cld, 5, seed=8)

    def noise_for(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return lambda shape: per_row_noise(shape, generators, "cpu", F64)

    for sampler in (sscs_sample, euler_maruyama_sample):
        batch, _ = sampler(cld, score, x, v, 10, noise_for(range(5)))
        alone, _ = sampler(cld, score, x[2:3], v[2:3], 10, noise_for([2]))
        assert torch.equal(alone[0], batch[2])


# ---------------------------------------------------------------------------------------------
# 6. Randomness only through `noise`


def test_samplers_draw_all_randomness_through_noise():
    cld = CLD()
    score = _gaussian_data_score(cld)
    x, v = _prior(cld, 8, seed=9)
    for sampler in (sscs_sample, euler_maruyama_sample):
        outputs = []
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)  # a different global RNG state must not matter
            outputs.append(sampler(cld, score, x, v, 12, _seeded_noise(10), progress=True))
        assert all(torch.equal(a, b) for a, b in zip(*outputs))
        assert all(o.dtype == torch.float32 for o in outputs[0])
        other, _ = sampler(cld, score, x, v, 12, _seeded_noise(11))
        assert not torch.equal(other, outputs[0][0])  # ...while the noise does

    def no_noise(shape):
        raise AssertionError("the probability-flow ODE must not draw noise")

    for solver in ("adaptive", "rk4"):
        a = probability_flow_sample(cld, score, x, v, 20, no_noise, solver=solver, progress=True)
        b = probability_flow_sample(cld, score, x, v, 20, no_noise, solver=solver)
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_sampler_arguments_are_checked():
    cld = CLD()
    score = _gaussian_data_score(cld)
    x, v = _prior(cld, 2, seed=12)
    with pytest.raises(ValueError):
        sscs_sample(cld, score, x, v, 1, _seeded_noise(0))  # one evaluation is only the denoising step
    with pytest.raises(ValueError):
        euler_maruyama_sample(cld, score, x, v[:, :2], 5, _seeded_noise(0))
    with pytest.raises(ValueError):
        probability_flow_sample(cld, score, x, v, 5, solver="midpoint")
