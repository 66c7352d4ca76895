"""Progressive distillation: targets, parameterisations, loss weights, guided teachers, students."""
import pytest
import torch

from diffusion import create_diffusion
from diffusion.continuous_ddim import ddim_sample, ddim_step
from diffusion.continuous_schedule import ContinuousSchedule
from diffusion.guidance import guided_model_fn
from diffusion.progressive_distillation import (
    distillation_target,
    is_power_of_two,
    loss_weight,
    output_from_x,
    stage_step_counts,
    stage_times,
    x_from_output,
)
from diffusion.schedule import get_beta_schedule
from methods.diffusion import eps_denoiser
from methods.distill import DistillMethod, Guidance, make_student, sampling_scale, student_denoiser
from models import create_model

NUM_CLASSES = 5
MARGS = dict(name="DiT-T/4", input_size=8, in_channels=2, num_classes=NUM_CLASSES, learn_sigma=True,
             class_dropout_prob=0.1)


def random_dit(seed=0, **overrides):
    """A tiny DiT with every trainable weight random (the zero-initialised layers would hide bugs)."""
    torch.manual_seed(seed)
    model = create_model(**{**MARGS, **overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def schedule():
    return ContinuousSchedule(get_beta_schedule("linear", 1000))


def col(v):
    return v.float().view(-1, 1, 1, 1)


# ------------------------------------------------------------------ parameterisations and weights


@pytest.mark.parametrize("parameterization", ["v", "x", "eps"])
def test_conversions_round_trip(schedule, parameterization):
    t = torch.tensor([0.05, 0.4, 0.9, 1.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    x, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    z = col(alpha) * x + col(sigma) * eps
    out = output_from_x(x, z, alpha, sigma, parameterization)
    expected = {"v": col(alpha) * eps - col(sigma) * x, "x": x, "eps": eps}[parameterization]
    assert torch.allclose(out, expected, atol=1e-3)  # eps from x divides by sigma (0.01 at t = 0.05)
    assert torch.allclose(x_from_output(out, z, alpha, sigma, parameterization), x, atol=1e-4)


def test_loss_weights_are_the_released_ones(schedule):
    t = torch.tensor([0.01, 0.2, 0.5, 0.99], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    x, eps, x_hat = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    z = col(alpha) * x + col(sigma) * eps
    x_mse = ((x - x_hat) ** 2).mean(dim=(1, 2, 3))
    eps_mse = ((output_from_x(x, z, alpha, sigma, "eps") - output_from_x(x_hat, z, alpha, sigma, "eps")) ** 2).mean(dim=(1, 2, 3))
    v_mse = ((output_from_x(x, z, alpha, sigma, "v") - output_from_x(x_hat, z, alpha, sigma, "v")) ** 2).mean(dim=(1, 2, 3))
    truncated = loss_weight("snr_trunc", alpha, sigma) * x_mse
    assert torch.allclose(truncated, torch.maximum(x_mse, eps_mse), rtol=1e-4)
    assert torch.allclose(loss_weight("snr_plus_one", alpha, sigma) * x_mse, v_mse, rtol=1e-4)
    with pytest.raises(ValueError, match="snr_trunc"):
        loss_weight("snr", alpha, sigma)


def test_stage_step_counts_and_bad_values():
    assert stage_step_counts(64, 2) == [32, 16, 8, 4, 2]
    assert stage_step_counts(1024, 1)[-3:] == [4, 2, 1] and len(stage_step_counts(1024, 1)) == 10
    assert is_power_of_two(1) and not is_power_of_two(12) and not is_power_of_two(0)
    for start, end, message in ((48, 2, "power of two"), (64, 3, "power of two"), (8, 16, "smaller"), (8, 8, "smaller")):
        with pytest.raises(ValueError, match=message):
            stage_step_counts(start, end)


def test_stage_times():
    t, mid, end = stage_times(torch.tensor([0, 3]), 4)
    assert t.tolist() == [0.25, 1.0] and mid.tolist() == [0.125, 0.875] and end.tolist() == [0.0, 0.75]


# ------------------------------------------------------------------ targets


def two_teacher_steps(teacher, schedule, z_t, t, mid, end, y, scale):
    (a_t, s_t), (a_m, s_m), (a_e, s_e) = (schedule.alpha_sigma(u) for u in (t, mid, end))
    z_mid = ddim_step(z_t, teacher(z_t, t, y, scale), a_t, s_t, a_m, s_m)
    return ddim_step(z_mid, teacher(z_mid, mid, y, scale), a_m, s_m, a_e, s_e)


@pytest.mark.parametrize("steps", [1, 4, 32])
def test_one_student_step_with_the_target_lands_where_two_teacher_steps_land(schedule, steps):
    teacher_model = random_dit()
    teacher = eps_denoiser(teacher_model, schedule, NUM_CLASSES, 2, all_channels=False)
    index = torch.arange(steps).repeat_interleave(2)[: 2 * steps]
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(len(index), 2, 8, 8, generator=g), torch.randn(len(index), 2, 8, 8, generator=g)
    y = torch.arange(len(index)) % NUM_CLASSES
    t, mid, end = stage_times(index, steps)
    a_t, s_t = schedule.alpha_sigma(t)
    a_e, s_e = schedule.alpha_sigma(end)
    z_t = col(a_t) * x + col(s_t) * noise
    with torch.no_grad():
        z_end = two_teacher_steps(teacher, schedule, z_t, t, mid, end, y, 1.5)
        target = distillation_target(z_t, z_end, a_t, s_t, a_e, s_e)
        assert torch.allclose(ddim_step(z_t, target, a_t, s_t, a_e, s_e), z_end, atol=1e-5)
        first = index == 0  # t'' = 0: the target is the teacher's second x_hat (the released i = 0 case)
        (a_m, s_m) = schedule.alpha_sigma(mid)
        z_mid = ddim_step(z_t, teacher(z_t, t, y, 1.5), a_t, s_t, a_m, s_m)
        assert torch.allclose(target[first], teacher(z_mid, mid, y, 1.5)[first], atol=1e-5)


@pytest.mark.parametrize("i", [0, 3, 7])
def test_targets_are_built_from_the_teachers_2n_step_ddim(schedule, i):
    """The method's x_tilde, stepped by one student DDIM step, equals the teacher's DDIM sampler at 2N
    steps run over its two grid steps 2(i+1) -> 2i."""
    steps = 8
    teacher = eps_denoiser(random_dit(), schedule, NUM_CLASSES, 2, all_channels=False)
    method = DistillMethod(random_dit(1), teacher, schedule, steps, "v", "snr_trunc", Guidance(2.0))
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    y = torch.tensor([0, 3, 4])
    index = torch.full((3,), i)
    z_t, target, (a_t, s_t) = method.targets(x, y, index, 2.0, noise)
    t, _, end = stage_times(index, steps)
    a_e, s_e = schedule.alpha_sigma(end)
    student_step = ddim_step(z_t, target, a_t, s_t, a_e, s_e)
    sampler = ddim_sample(lambda z, u: teacher(z, u, y, 2.0), z_t, schedule, 2 * steps, start=2 * (i + 1), stop=2 * i)
    assert torch.allclose(student_step, sampler, atol=1e-5)


# ------------------------------------------------------------------ guidance and students


def test_guided_teacher_is_dits_cfg(schedule):
    """At an integer step the teacher's x_hat is IDDPM's x_0 from DiT's guided epsilon (3-channel rule)."""
    model = random_dit(in_channels=4)
    diffusion = create_diffusion(1000, "linear", learn_sigma=True)
    teacher = eps_denoiser(model, schedule, NUM_CLASSES, 4, all_channels=False)
    k = torch.tensor([0, 250, 999])
    t = (k + 1).double() / 1000
    z, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 4])
    with torch.no_grad():
        eps = guided_model_fn(model, y, 4.0, NUM_CLASSES)(z, k)[:, :4]
        expected = diffusion.predict_xstart_from_eps(z, k, eps)
        assert torch.allclose(teacher(z, t, y, 4.0), expected, rtol=1e-4, atol=1e-4)
        # per-row scales: the same as each row with its own scalar scale
        scales = torch.tensor([1.0, 2.5, 4.0])
        rows = torch.cat([teacher(z[j:j + 1], t[j:j + 1], y[j:j + 1], float(scales[j])) for j in range(3)])
        assert torch.allclose(teacher(z, t, y, scales), rows, rtol=1e-4, atol=1e-3)  # x = (z - s eps)/a, a = 0.006 at t = 1


def test_scale_conditioned_copy_of_the_teacher_gives_its_outputs(schedule):
    teacher = random_dit()
    student, margs = make_student(MARGS, teacher.state_dict(), scale_conditioned=True)
    assert margs["guidance_embedding"] is True and student.guidance_embedder is not None
    student.eval()
    z, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 3])
    t = torch.tensor([3.0, 100.5, 500.0, 999.0])
    with torch.no_grad():
        assert torch.equal(student(z, t, y, s=torch.tensor([1.0, 2.0, 3.5, 7.0])), teacher(z, t, y))
    student.train()  # and the scale embedding learns: its zero output layer gets a gradient
    student(z, t, y, s=torch.tensor([1.0, 2.0, 3.5, 7.0])).pow(2).mean().backward()
    assert student.guidance_embedder.mlp[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="guidance scale"):
        student(z, t, y)


def test_student_has_no_label_dropout_and_keeps_the_null_class():
    student, margs = make_student(MARGS, random_dit().state_dict(), scale_conditioned=False)
    assert student.y_embedder.dropout_prob == 0.0 and student.y_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1
    assert margs["guidance_embedding"] is False
    student.train()
    z, t, y = torch.randn(64, 2, 8, 8), torch.full((64,), 10.0), torch.zeros(64, dtype=torch.long)
    assert torch.equal(student(z, t, y), student.eval()(z, t, y))


def test_student_denoiser_reads_its_output_as_v(schedule):
    model = random_dit()
    denoise = student_denoiser(model, schedule, "v", 2, scale_conditioned=False)
    z, y, t = torch.randn(2, 2, 8, 8), torch.tensor([0, 1]), torch.tensor([0.3, 0.9], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    with torch.no_grad():
        v = model(z, schedule.model_timesteps(t), y)[:, :2]
        assert torch.allclose(denoise(z, t, y, 1.0), col(alpha) * z - col(sigma) * v, atol=1e-6)


def test_distillation_loss_trains_the_student(schedule):
    """A few Adam steps on one batch lower the distillation loss (the gradient reaches the student)."""
    teacher = lambda z, t, y, scale: 0.5 * z  # a smooth, bounded stand-in for a teacher's x_hat
    student, _ = make_student(MARGS, random_dit().state_dict(), scale_conditioned=False)
    method = DistillMethod(student, teacher, schedule, 4, "v", "snr_trunc", Guidance(1.0))
    x, y = torch.randn(16, 2, 8, 8), torch.arange(16) % NUM_CLASSES
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(0)
        loss, metrics = method.loss("model", {"model": student}, x, y, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert set(metrics) == {"loss", "x_mse"}
    assert losses[-1] < 0.5 * losses[0]


def test_guidance_draws_and_sampling_scales():
    fixed, ranged = Guidance(1.5), Guidance(1.5, (1.0, 4.0))
    assert fixed.draw(3, torch.Generator(), torch.device("cpu")) == 1.5
    a = ranged.draw(1000, torch.Generator().manual_seed(0), torch.device("cpu"))
    b = ranged.draw(1000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(a, b) and a.min() >= 1.0 and a.max() <= 4.0 and a.std() > 0.5
    assert sampling_scale({"cfg_range": None, "cfg_scale": 1.5}, 1.5) == 1.5
    with pytest.raises(ValueError, match="folded in"):
        sampling_scale({"cfg_range": None, "cfg_scale": 1.5}, 4.0)
    assert sampling_scale({"cfg_range": [1.0, 4.0], "cfg_scale": 1.5}, 3.0) == 3.0
    with pytest.raises(ValueError, match=r"\[1.0, 4.0\]"):
        sampling_scale({"cfg_range": [1.0, 4.0], "cfg_scale": 1.5}, 5.0)
