"""The adversarial losses of a denoising diffusion GAN: non-saturating GAN loss and the R1 penalty.

With D's logits l: the discriminator minimises softplus(-l_real) + softplus(l_fake) (= -log D(real)
- log(1 - D(fake)) with D = sigmoid(l)); the generator minimises softplus(-l_fake) (the
non-saturating form of Goodfellow et al. 2014, as DDGAN). R1 (Mescheder et al. 2018) penalises
the gradient of D's logit at real inputs: gamma / 2 * E ||grad_x l(x_real)||^2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of softplus(-l_real) + softplus(l_fake)."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of softplus(-l_fake): the non-saturating generator loss."""
    return F.softplus(-logits_fake).mean()


def r1_penalty(logits_real: torch.Tensor, real_input: torch.Tensor) -> torch.Tensor:
    """E ||d logit / d x||^2 at the real inputs (differentiable: the penalty's gradient trains D).

    `real_input` must require grad and `logits_real` depend on it; gamma / 2 is the caller's.
    """
    (grad,) = torch.autograd.grad(logits_real.float().sum(), real_input, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(dim=1).mean()
