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
from .image_generation import EDITING_GUIDANCE, Branch, GuidanceSettings, batch_groups, denoise_batch, group_callback
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


@dataclass
class EditItem:
    """One input of a batch, ready to denoise: its condition, final instruction, output size and noise."""

    condition: ConditionImage
    instruction: str
    height: int
    width: int
    noise: torch.Tensor


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

    @torch.inference_mode()
    def analyze_image(self, image, instruction: str) -> str:
        """``analyze`` for an image of any size: the model sees it resized by the generator's VAE rule."""
        resized = resize_to_rule(read_image(image).to_pil(), self.parts.config.transforms.gen_vae)
        return self.analyze(ConditionImage(resized, torch.empty(0), (0, 0), torch.empty(0)), instruction)

    @torch.inference_mode()
    def explain(self, image, instruction: str, settings: GuidanceSettings, explain_tokens: int) -> str:
        """The explanation an edit decodes after its target image, without making the image: nothing attends to
        the target, so it depends only on the input (resized by the VAE rule) and the instruction."""
        condition = self.encode_condition(image, "mean", None)
        cond, _ = self.build_branches(condition, instruction, settings, explain_tokens)
        return decode_text(cond, None, self.parts.tokenizer, explain_tokens).text

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
        return self.batch([image], [instruction], height, width, settings, generator,
                          None if latents is None else [latents], vae_posterior, analyze_first, output_type,
                          progress, callback, task, explain_tokens)[0]

    def prepare(self, images: list, instructions: list[str], heights: list, widths: list, latents: list,
                settings: GuidanceSettings, generator, vae_posterior: str, analyze_first: bool) -> list[EditItem]:
        """Each input encoded, sized and given its noise, image after image (with one ``generator``, as the
        same number of single calls would draw from it: posterior sample, then noise)."""
        generators = generator if isinstance(generator, (list, tuple)) else [generator] * len(images)
        if len(generators) != len(images):
            raise ValueError(f"got {len(generators)} generators for {len(images)} images")
        items = []
        for k, (image, instruction, gen) in enumerate(zip(images, instructions, generators)):
            lat = latents[k]
            condition = self.encode_condition(image, vae_posterior, gen)
            height, width = self.output_size(condition, heights[k], widths[k], lat)
            if analyze_first:
                instruction = self.analyze(condition, instruction)
            noise = initial_noise(self.parts, height, width, lat, gen)
            items.append(EditItem(condition, instruction, height, width, noise))
        return items

    @torch.inference_mode()
    def batch(self, images: list, instructions: list[str], height=None, width=None,
              settings: GuidanceSettings = EDITING_GUIDANCE, generator=None, latents=None,
              vae_posterior: str = "mean", analyze_first: bool = False, output_type: str = "pil",
              progress: bool | None = None, callback: Callable[[int, int], None] | None = None,
              task: str = "image-to-image", explain_tokens: int = 0, batch_size: int | None = None) -> list:
        """``__call__`` for several inputs: images of the same output size share forwards (at most
        ``batch_size``); ``height``/``width``/``latents`` are one per input or one for all
        (docs/sampling.md#batched-requests)."""
        instructions = per_item(instructions, len(images), "instructions")
        for instruction in instructions:
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError("instruction must be a non-empty string")
        check_guidance(settings, output_type)
        if latents is not None and not isinstance(latents, (list, tuple)) and torch.as_tensor(latents).dim() == 4:
            latents = list(torch.as_tensor(latents))
        items = self.prepare(images, instructions, per_item(height, len(images), "height"),
                             per_item(width, len(images), "width"), per_item(latents, len(images), "latents"),
                             settings, generator, vae_posterior, analyze_first)
        groups = batch_groups([(it.height, it.width) for it in items], batch_size)
        out = [None] * len(items)
        for g, group in enumerate(groups):
            report = group_callback(callback, g, len(groups), settings.num_inference_steps)
            for k, result in zip(group, self.run_group([items[k] for k in group], settings, progress, report,
                                                       output_type, task, explain_tokens)):
                out[k] = result
        return out

    def run_group(self, items: list[EditItem], settings: GuidanceSettings, progress, callback, output_type: str,
                  task: str, explain_tokens: int) -> list:
        contexts = [self.build_branches(it.condition, it.instruction, settings, explain_tokens) for it in items]
        d = self.parts.config.latent_downsample
        height, width = items[0].height, items[0].width
        tokens = denoise_batch([branches for _, branches in contexts], height // d, width // d,
                               torch.stack([it.noise for it in items]), settings,
                               self.parts.show_progress(progress), callback)
        out = []
        for it, (cond, _), t in zip(items, contexts, tokens):
            result = decode_output(self.parts, t, height, width, output_type, task, it.instruction)
            # The explanation follows the target image, which (as in training) no later token attends to.
            out.append((result, decode_text(cond, None, self.parts.tokenizer, explain_tokens).text)
                       if explain_tokens else result)
        return out


def per_item(value, count: int, name: str) -> list:
    """One value per input: a list of ``count`` values, or one value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name}: got {len(value)} values for {count} inputs")
        return list(value)
    return [value] * count
