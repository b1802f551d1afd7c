"""Text-to-image (docs/token-layout.md#worked-layouts, docs/sampling.md).

    conditional context: [<|im_start|> prompt <|im_end|>]; text-unconditional: empty;
    image-unconditional: the conditional tokens again (there is no image to leave out)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..modeling.layout import text_block_len
from .components import Components
from .context import Context
from .image_generation import (
    TEXT_TO_IMAGE_GUIDANCE,
    Branch,
    GuidanceSettings,
    batch_groups,
    denoise_batch,
    group_callback,
)
from .latents import check_guidance, check_size, decode_output, initial_noises, size_from_latents

__all__ = ["TextToImagePipeline"]


class TextToImagePipeline:
    def __init__(self, parts: Components):
        self.parts = parts

    def check_inputs(self, prompt: str, height, width, latents, settings: GuidanceSettings,
                     output_type: str) -> tuple[int, int]:
        """Validate; returns the output size (the model's default where not given)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        height, width = size_from_latents(self.parts, latents, height, width)
        default_h, default_w = self.parts.config.default_generation_size
        height, width = height or default_h, width or default_w
        check_size(self.parts, height, width)
        check_guidance(settings, output_type)
        return height, width

    def build_branches(self, prompt: str, settings: GuidanceSettings) -> tuple[Context, list[Branch]]:
        ids = self.parts.encode_text(prompt)
        cond = Context(self.parts.model, self.parts.special, text_block_len(len(ids)))
        cond.add_text(ids)
        branches = [Branch.of(cond), Branch(cond, 0, 0), Branch.of(cond)]
        return cond, branches[: settings.max_branches()]

    @torch.inference_mode()
    def __call__(self, prompt: str, height: int | None = None, width: int | None = None,
                 settings: GuidanceSettings = TEXT_TO_IMAGE_GUIDANCE, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", progress: bool | None = None,
                 callback: Callable[[int, int], None] | None = None):
        return self.batch([prompt], height, width, settings, generator,
                          None if latents is None else torch.as_tensor(latents)[None], output_type, progress,
                          callback)[0]

    @torch.inference_mode()
    def batch(self, prompts: list[str], height: int | None = None, width: int | None = None,
              settings: GuidanceSettings = TEXT_TO_IMAGE_GUIDANCE,
              generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
              output_type: str = "pil", progress: bool | None = None,
              callback: Callable[[int, int], None] | None = None, batch_size: int | None = None) -> list:
        """One image per prompt, ``batch_size`` images (default: all) per forward; image k equals a single
        run of prompt k with image k's noise (``initial_noises``, docs/sampling.md#batched-requests)."""
        if not prompts:
            raise ValueError("no prompts")
        for prompt in prompts:
            height, width = self.check_inputs(prompt, height, width, latents, settings, output_type)
        noises = initial_noises(self.parts, len(prompts), height, width, latents, generator)
        d = self.parts.config.latent_downsample
        groups = batch_groups([None] * len(prompts), batch_size)
        out = [None] * len(prompts)
        for g, group in enumerate(groups):
            branches = [self.build_branches(prompts[k], settings)[1] for k in group]
            tokens = denoise_batch(branches, height // d, width // d, torch.stack([noises[k] for k in group]),
                                   settings, self.parts.show_progress(progress),
                                   group_callback(callback, g, len(groups), settings.num_inference_steps))
            for k, t in zip(group, tokens):
                out[k] = decode_output(self.parts, t, height, width, output_type, "text-to-image", prompts[k])
        return out
