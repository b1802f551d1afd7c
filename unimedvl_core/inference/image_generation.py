"""The denoising loop with batched classifier-free guidance (docs/sampling.md#branches).

The three guidance branches (conditional, text-unconditional, image-unconditional) differ only in what
they attend to, so they run as rows of one batch: each row's cache holds its own context, the query block
(noisy latents between vision markers) is shared and placed at each row's own rope position. One forward
per step instead of three; rows a step does not need are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..modeling.attention import CachedAttention
from ..modeling.kv_cache import KVCache
from .context import Context, image_routing
from .sampling import branches_needed, combine_guidance, guidance_scales, make_scheduler

__all__ = ["Branch", "GuidanceSettings", "denoise", "TEXT_TO_IMAGE_GUIDANCE", "EDITING_GUIDANCE"]


@dataclass
class Branch:
    """One guidance branch: the first ``length`` cached tokens of a context and its next rope position."""

    context: Context
    length: int
    rope: int

    @classmethod
    def of(cls, context: Context) -> "Branch":
        return cls(context, context.length, context.rope)


@dataclass(frozen=True)
class GuidanceSettings:
    """Sampler and guidance settings; the defaults are the released text-to-image settings."""

    num_inference_steps: int = 49
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    timestep_shift: float = 3.0
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0

    def max_branches(self) -> int:
        """Branches any step of the schedule will need, so that no unused context is built."""
        scheduler = make_scheduler(self.num_inference_steps, self.timestep_shift)
        return max(branches_needed(*guidance_scales(t, self.cfg_interval, self.cfg_text_scale, self.cfg_img_scale))
                   for t in scheduler.sigmas[:-1])


# The released scripts' settings (docs/sampling.md#defaults): 49 evaluations = the published 50-timestep
# schedule. Editing guides on the input image too, over the whole flow, renormalising per token.
TEXT_TO_IMAGE_GUIDANCE = GuidanceSettings()
EDITING_GUIDANCE = GuidanceSettings(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


def denoise(context: Context, branches: list[Branch], h: int, w: int, noise_tokens: torch.Tensor,
            settings: GuidanceSettings, progress: bool = True,
            callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate the flow from noise tokens (h*w, p*p*z) at t=1 to t=0; returns fp32 latent tokens.

    ``branches`` are ordered (conditional, text-unconditional, image-unconditional); trailing ones may be
    omitted when guidance never needs them. ``callback(step, total)`` runs after every step.
    """
    model = context.model
    device, special = context.device, context.special
    n = h * w
    query_len = n + 2
    cache = KVCache.stack([(b.context.cache, 0, b.length) for b in branches], extra_capacity=query_len)
    ropes = torch.tensor([b.rope for b in branches], device=device)
    positions = ropes[:, None].expand(len(branches), query_len)
    latent_pos = model.latent_position_ids(h, w, device)
    routing = image_routing(n, device)
    markers = model.embed_tokens(torch.tensor([special.vision_start, special.vision_end], device=device))
    attention = {}  # per branch count; masks depend only on the cache lengths

    scheduler = make_scheduler(settings.num_inference_steps, settings.timestep_shift)
    x = noise_tokens.to(device=device, dtype=torch.float32).clone()
    total = len(scheduler.timesteps)
    for i, timestep in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        sigma = scheduler.sigmas[i]
        text_scale, img_scale = guidance_scales(sigma, settings.cfg_interval, settings.cfg_text_scale,
                                                settings.cfg_img_scale)
        rows = min(branches_needed(text_scale, img_scale), len(branches))
        if rows not in attention:
            attention[rows] = CachedAttention(cache, query_len, causal=False, rows=rows)
        tokens = model.embed_latent_tokens(x, sigma.reshape(1).to(device), latent_pos)
        seq = torch.cat([markers[:1], tokens.to(markers.dtype), markers[1:]])[None].expand(rows, -1, -1)
        hidden = model.run_llm(seq, positions[:rows], routing, attention[rows])
        v = model.velocity(hidden[:, 1:-1]).float()
        v = combine_guidance(v[0], v[1] if rows > 1 else None, v[2] if rows > 2 else None, text_scale, img_scale,
                             settings.cfg_renorm_type, settings.cfg_renorm_min)
        x = scheduler.step(v, timestep, x).prev_sample
        if callback is not None:
            callback(i + 1, total)
    return x
