"""The rectified-flow training objective of image generation, in one place (docs/training.md).

- flow time: logit-normal, t = sigmoid(u) with u ~ N(0, 1), then optionally shifted toward noise,
  t' = s t / (1 + (s - 1) t);
- noising: x_t = (1 - t) x0 + t eps, eps ~ N(0, I), per latent token;
- target: the velocity v = eps - x0 of the supervised (noisy) latent tokens;
- loss: squared error averaged over channels, summed over tokens; the trainer divides the sum by the
  global number of supervised tokens (``token_mean``), as for the text cross-entropy.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["sample_flow_time", "shift_flow_time", "noise_latents", "velocity_target", "flow_inputs",
           "velocity_loss_sum", "token_mean"]


def shift_flow_time(t: float, shift: float) -> float:
    """``s t / (1 + (s - 1) t)``: with ``shift`` > 1, more training time near the noise end."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_flow_time(rng: np.random.Generator, shift: float = 1.0) -> float:
    """A logit-normal flow time in (0, 1), shifted; one draw of ``rng``."""
    t = 1.0 / (1.0 + math.exp(-float(rng.standard_normal())))
    return shift_flow_time(t, shift)


def noise_latents(x0: torch.Tensor, t: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latent tokens (N, D) at flow times t (N,) -> (x_t, eps); t = 0 leaves a token clean."""
    t = t.to(x0.device)[:, None]
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    return (1 - t) * x0 + t * eps, eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """What the model predicts for a noisy latent token: the velocity eps - x0."""
    return eps - x0


def flow_inputs(x0: torch.Tensor, timesteps: torch.Tensor, supervised: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent tokens as the model sees them (x_t; clean conditions stay clean at t = 0) and the velocity
    targets of the ``supervised`` rows, in that order."""
    x_t, eps = noise_latents(x0, timesteps, generator)
    return x_t, velocity_target(x0, eps)[supervised.to(x0.device)]


def velocity_loss_sum(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared velocity error in fp32, averaged over channels and summed over tokens."""
    error = predicted.float() - target.to(predicted.device).float()
    return error.pow(2).mean(-1).sum()


def token_mean(loss_sum: torch.Tensor, global_count: torch.Tensor, world: int) -> torch.Tensor:
    """A per-rank loss sum as this rank's share of the mean over all ranks' supervised tokens: gradients
    averaged by data parallelism then equal those of the global mean."""
    return loss_sum * world / global_count.clamp(min=1)
