"""Image-to-image from an instruction (docs/token-layout.md#worked-layouts, docs/prompts.md#editing).

    conditional: [VAE block of the input] [ViT block of the input] [<|im_start|> instruction <|im_end|>]
    text-unconditional: the two image blocks only; image-unconditional: the instruction only

The input is resized by the generator's VAE rule, encoded, and that resized image resized again by the
generator's ViT rule, as the editing script does (docs/preprocessing.md#editing-inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from ..io.medical_io import read_image
from ..modeling.layout import TokenLayout, text_block_len
from ..modeling.preprocessing import resize_to_rule, to_model_tensor
from ..modeling.vae import patchify_latent, vae_encode
from .components import Components
from .context import Context
from .image_generation import EDITING_GUIDANCE, Branch, GuidanceSettings, denoise
from .latents import check_guidance, check_size, decode_output, initial_noise, size_from_latents
from .prompts import EDIT_ANALYSIS, EDIT_ANALYSIS_JOINER
from .text_generation import ANALYSIS_TOKENS, decode_text
from .understanding import UnderstandingPipeline, vit_input, vit_token_count

__all__ = ["EditingPipeline", "ConditionImage"]

VAE_POSTERIORS = ("mean", "sample")


@dataclass
class ConditionImage:
    """The input image as the model sees it: resized (PIL), VAE latent tokens on an (h, w) grid, ViT tensor."""

    resized: Image.Image
    latent_tokens: torch.Tensor
    grid: tuple[int, int]
    vit: torch.Tensor


class EditingPipeline:
    def __init__(self, parts: Components):
        self.parts = parts

    def encode_condition(self, image, vae_posterior: str, generator) -> ConditionImage:
        if vae_posterior not in VAE_POSTERIORS:
            raise ValueError(f"vae_posterior must be 'mean' or 'sample', got {vae_posterior!r}")
        cfg = self.parts.config
        resized = resize_to_rule(read_image(image).to_pil(), cfg.transforms.gen_vae)
        latent = vae_encode(self.parts.vae, to_model_tensor(resized)[None].to(self.parts.device), cfg.vae,
                            sample=vae_posterior == "sample", generator=generator)[0]
        p = cfg.latent_patch_size
        grid = (latent.shape[1] // p, latent.shape[2] // p)
        return ConditionImage(resized, patchify_latent(latent, p), grid, vit_input(resized, cfg.transforms.gen_vit))

    def analyze(self, condition: ConditionImage, instruction: str) -> str:
        """The editing script's describe-first pass: its answer is appended to the instruction."""
        answer = UnderstandingPipeline(self.parts)([condition.resized], EDIT_ANALYSIS.format(instruction=instruction),
                                                   max_new_tokens=ANALYSIS_TOKENS)
        return instruction + EDIT_ANALYSIS_JOINER + answer.text

    def build_branches(self, condition: ConditionImage, instruction: str, settings: GuidanceSettings,
                       explain_tokens: int) -> tuple[Context, list[Branch]]:
        parts = self.parts
        ids = parts.encode_text(instruction)
        lh, lw = condition.grid
        capacity = TokenLayout.planned_length(text=[len(ids)],
                                              images=[lh * lw, vit_token_count(parts, condition.vit)],
                                              extra=1 + explain_tokens if explain_tokens else 0)
        cond = Context(parts.model, parts.special, capacity)
        cond.add_vae_latents(condition.latent_tokens, lh, lw)
        cond.add_vit_image(condition.vit)
        image_only = Branch.of(cond)
        cond.add_text(ids)
        branches = [Branch.of(cond), image_only]
        if settings.max_branches() == 3:
            text_only = Context(parts.model, parts.special, text_block_len(len(ids)))
            text_only.add_text(ids)
            branches.append(Branch.of(text_only))
        return cond, branches[: settings.max_branches()]

    def output_size(self, condition: ConditionImage, height, width, latents) -> tuple[int, int]:
        height, width = size_from_latents(self.parts, latents, height, width)
        height, width = height or condition.resized.height, width or condition.resized.width
        check_size(self.parts, height, width)
        return height, width

    @torch.inference_mode()
    def __call__(self, image, instruction: str, height: int | None = None, width: int | None = None,
                 settings: GuidanceSettings = EDITING_GUIDANCE, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, vae_posterior: str = "mean", analyze_first: bool = False,
                 output_type: str = "pil", progress: bool | None = None,
                 callback: Callable[[int, int], None] | None = None, task: str = "image-to-image",
                 explain_tokens: int = 0):
        """The edited image; with ``explain_tokens``, also the model's explanation decoded after it."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("instruction must be a non-empty string")
        check_guidance(settings, output_type)
        condition = self.encode_condition(image, vae_posterior, generator)
        height, width = self.output_size(condition, height, width, latents)
        if analyze_first:
            instruction = self.analyze(condition, instruction)
        noise = initial_noise(self.parts, height, width, latents, generator)
        cond, branches = self.build_branches(condition, instruction, settings, explain_tokens)
        d = self.parts.config.latent_downsample
        tokens = denoise(cond, branches, height // d, width // d, noise, settings, self.parts.show_progress(progress),
                         callback)
        result = decode_output(self.parts, tokens, height, width, output_type, task, instruction)
        if not explain_tokens:
            return result
        # The explanation follows the target image, which (as in training) no later token attends to.
        return result, decode_text(cond, None, self.parts.tokenizer, explain_tokens).text
