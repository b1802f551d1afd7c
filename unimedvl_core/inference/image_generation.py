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

__all__ = ["Branch", "GuidanceSettings", "denoise", "denoise_batch", "batch_groups", "group_callback",
           "TEXT_TO_IMAGE_GUIDANCE", "EDITING_GUIDANCE"]


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
    return denoise_batch([branches], h, w, noise_tokens[None], settings, progress, callback)[0]


def batch_groups(keys: list, batch_size: int | None) -> list[list[int]]:
    """Indices of images that can share a forward (the same key, e.g. output size), in order of first
    appearance, cut into groups of at most ``batch_size`` (default: no bound)."""
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_key: dict = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    size = len(keys) if batch_size is None else int(batch_size)
    return [same[i:i + size] for same in by_key.values() for i in range(0, len(same), size)]


def group_callback(callback: Callable[[int, int], None] | None, group: int, groups: int,
                   steps: int) -> Callable[[int, int], None] | None:
    """Group ``group``'s step callback counting the steps of all groups: it ends at total = groups * steps."""
    if callback is None:
        return None
    return lambda step, _total: callback(group * steps + step, groups * steps)


def _stack_rows(images: list[list[Branch]], query_len: int) -> tuple[KVCache, torch.Tensor]:
    """Rows ordered branch-major, (branch j, image i) at row j*N + i, so that the rows of the first k branches
    of every image are the first k*N rows (what ``CachedAttention(rows=...)`` runs)."""
    order = [branches[j] for j in range(len(images[0])) for branches in images]
    cache = KVCache.stack([(b.context.cache, 0, b.length) for b in order], extra_capacity=query_len)
    ropes = torch.tensor([b.rope for b in order], device=images[0][0].context.device)
    return cache, ropes[:, None].expand(len(order), query_len)


def denoise_batch(images: list[list[Branch]], h: int, w: int, noise_tokens: torch.Tensor,
                  settings: GuidanceSettings, progress: bool = True,
                  callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``denoise`` for N images of one size at once: ``images[i]`` are image i's branches (the same count for
    every image), ``noise_tokens`` (N, h*w, p*p*z); returns (N, h*w, p*p*z) fp32. Every step runs the needed
    branches of every image as rows of one forward; each image combines its own rows (``combine_guidance``).
    """
    if len({len(b) for b in images}) != 1 or noise_tokens.shape[0] != len(images):
        raise ValueError("every image needs the same number of branches and its own noise")
    context = images[0][0].context
    model, device, special = context.model, context.device, context.special
    count, n = len(images), h * w
    query_len = n + 2
    cache, positions = _stack_rows(images, query_len)
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
        k = min(branches_needed(text_scale, img_scale), len(images[0]))
        if k not in attention:
            attention[k] = CachedAttention(cache, query_len, causal=False, rows=k * count)
        # Each image's tokens are embedded alone, as a single-image run embeds them.
        tokens = torch.stack([model.embed_latent_tokens(x[b], sigma.reshape(1).to(device), latent_pos)
                              for b in range(count)]).to(markers.dtype)
        ends = markers[None].expand(count, -1, -1)
        seq = torch.cat([ends[:, :1], tokens, ends[:, 1:]], dim=1).repeat(k, 1, 1)
        hidden = model.run_llm(seq, positions[: k * count], routing, attention[k])
        v = model.velocity(hidden[:, 1:-1]).float()
        v = torch.stack([combine_guidance(*[v[j * count + b] if j < k else None for j in range(3)], text_scale,
                                          img_scale, settings.cfg_renorm_type, settings.cfg_renorm_min)
                         for b in range(count)])
        x = scheduler.step(v, timestep, x).prev_sample
        if callback is not None:
            callback(i + 1, total)
    return x
