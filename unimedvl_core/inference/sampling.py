"""Rectified-flow sampling: the shifted schedule, the Euler step, and classifier-free guidance (docs/sampling.md).

The schedule and step are diffusers' ``FlowMatchEulerDiscreteScheduler`` given explicit sigmas, which
reproduces the reference bit for bit (docs/sampling.md#scheduler). ``num_inference_steps`` counts velocity
evaluations: the reference's ``num_timesteps=N`` is ``num_inference_steps=N-1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers is imported when a schedule is made, not with this module
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

__all__ = ["make_scheduler", "guidance_scales", "branches_needed", "combine_guidance", "RENORM_TYPES"]

RENORM_TYPES = ("global", "channel", "text_channel")


def make_scheduler(num_inference_steps: int, timestep_shift: float) -> FlowMatchEulerDiscreteScheduler:
    """Times t_k = shift(linspace(1, 0, N+1)) with s*t / (1 + (s-1)*t); the model runs at t_0..t_{N-1} and
    the last step lands on t = 0. Pass ``scheduler.sigmas[i]`` (not ``timesteps``) to the model."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if timestep_shift <= 0:
        raise ValueError(f"timestep_shift must be > 0, got {timestep_shift}")
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=float(timestep_shift))
    sigmas = torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float32)[:-1]
    scheduler.set_timesteps(sigmas=sigmas.numpy())
    return scheduler


def guidance_scales(t: float | torch.Tensor, cfg_interval: tuple[float, float], cfg_text_scale: float,
                    cfg_img_scale: float) -> tuple[float, float]:
    """Guidance applies iff interval[0] < t <= interval[1] (on the shifted t); elsewhere both scales are 1.
    Compared in float32, as the reference compares its float32 t with the interval bounds."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if bool(t > cfg_interval[0]) and bool(t <= cfg_interval[1]):
        return cfg_text_scale, cfg_img_scale
    return 1.0, 1.0


def branches_needed(text_scale: float, img_scale: float) -> int:
    """How many of the (conditional, text-unconditional, image-unconditional) branches a step runs.
    Guidance happens only when the text scale is > 1; the image branch only when its scale is also > 1."""
    if text_scale <= 1.0:
        return 1
    return 3 if img_scale > 1.0 else 2


def combine_guidance(v_cond: torch.Tensor, v_text_uncond: torch.Tensor | None, v_img_uncond: torch.Tensor | None,
                     text_scale: float, img_scale: float, renorm_type: str = "global",
                     renorm_min: float = 0.0) -> torch.Tensor:
    """Combine the branch velocities (tokens x channels) as the reference does, with norm rescaling."""
    if text_scale <= 1.0:
        return v_cond
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {renorm_type!r}")
    use_img = img_scale > 1.0
    v_text = v_text_uncond + text_scale * (v_cond - v_text_uncond)
    if renorm_type == "text_channel":
        scale = (v_cond.norm(dim=-1, keepdim=True) / (v_text.norm(dim=-1, keepdim=True) + 1e-8))
        v_text = v_text * scale.clamp(min=renorm_min, max=1.0)
        return v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    v = v_img_uncond + img_scale * (v_text - v_img_uncond) if use_img else v_text
    if renorm_type == "global":
        scale = v_cond.norm() / (v.norm() + 1e-8)
    else:  # channel: per token over channels
        scale = v_cond.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + 1e-8)
    return v * scale.clamp(min=renorm_min, max=1.0)
