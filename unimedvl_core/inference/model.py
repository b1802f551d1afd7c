"""``UniMedVL``: load a checkpoint in the released layout and read or make medical images with it.

    model = UniMedVL.from_pretrained("/path/to/UniMedVL")
    model.answer("chest.dcm", "Is there a pleural effusion?")
    model.chat([{"role": "user", "content": "Is there an effusion?", "images": ["chest.dcm"]},
                {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Which side?"}])
    model.generate_image("Chest X-ray with a right lower lobe consolidation", height=512, width=512)
    model.edit_image("t2.nii.gz", "Translate this T2 MRI image into the corresponding FLAIR image.")

Each method is a front door over a pipeline (``understanding``, ``text_to_image``, ``editing``); the
defaults are the released scripts' (``GuidanceSettings`` presets, ``DECODING``), the same ones the task
registry (``unimedvl_core.tasks``) gives every surface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypedDict

import torch
from PIL import Image
from typing_extensions import Unpack

from ..io.medical_io import MedicalImage, read_image
from .components import Components
from .conversation import ConversationPipeline, Turn
from .image_generation import EDITING_GUIDANCE, TEXT_TO_IMAGE_GUIDANCE, GuidanceSettings
from .latents import OUTPUT_TYPES
from .prompts import report_prompt, staining_instruction, super_resolution_instruction, translation_instruction
from .text_generation import DECODING, EXPLANATION_TOKENS, TextOutput
from .text_to_image import TextToImagePipeline
from .tiled_editing import AnySizeEditing
from .tiling import DEFAULT_TILE_OVERLAP, MAX_OUTPUT_SIDE, TILED, WHOLE
from .understanding import UnderstandingPipeline

__all__ = ["UniMedVL", "CounterfactualResult", "ImageInput", "OUTPUT_TYPES"]

ImageInput = Any  # PIL image, numpy array, path (PNG/JPEG/DICOM/NIfTI/DICOM folder), pydicom Dataset, MedicalImage
T2I, EDIT = TEXT_TO_IMAGE_GUIDANCE, EDITING_GUIDANCE
Callback = Callable[[int, int], None]


class EditArgs(TypedDict, total=False):
    """The arguments of ``edit_image`` that the named image-to-image tasks pass through."""

    height: int | Sequence[int] | None
    width: int | Sequence[int] | None
    num_inference_steps: int
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    timestep_shift: float
    cfg_renorm_type: str
    cfg_renorm_min: float
    generator: torch.Generator | Sequence[torch.Generator] | None
    latents: torch.Tensor | Sequence[torch.Tensor] | None
    vae_posterior: str
    analyze_first: bool
    output_type: str
    progress: bool | None
    callback: Callback | None
    batch_size: int | None


_GUIDANCE_FIELDS = {f.name for f in fields(GuidanceSettings)}


@dataclass
class CounterfactualResult:
    image: Any
    explanation: str


class UniMedVL(Components):
    """The model with its VAE and tokenizer (``Components``), and the tasks users call."""

    @staticmethod
    def load_image(image: ImageInput) -> MedicalImage:
        return read_image(image)

    # ----- understanding -----

    def answer(self, image: ImageInput | Sequence[ImageInput], question: str,
               max_new_tokens: int = DECODING.max_new_tokens, do_sample: bool = DECODING.do_sample,
               temperature: float = DECODING.temperature, top_p: float = DECODING.top_p,
               stop_token_ids: Sequence[int] | None = None, streamer: Callable[[str], None] | None = None,
               generator: torch.Generator | None = None, output_logits: bool = False,
               return_dict: bool = False) -> str | TextOutput:
        """Answer a question about one image (or several, in order).

        Args:
            streamer: called with each new piece of text as it is decoded.
            stop_token_ids: ids that end decoding (default ``<|im_end|>``); not part of the answer.
            output_logits, return_dict: return a ``TextOutput`` with the token ids and, if asked, one row of
                logits per decoding step.
        """
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        out = UnderstandingPipeline(self)(images, question, max_new_tokens, do_sample, temperature, top_p,
                                          stop_token_ids, streamer, generator, output_logits)
        return out if return_dict or output_logits else out.text

    def chat(self, messages: Sequence[dict | Turn], max_new_tokens: int = DECODING.max_new_tokens,
             return_dict: bool = False, **decoding) -> str | TextOutput:
        """Answer the last user message of a conversation, with every earlier turn in the context.

        Args:
            messages: dicts ``{"role": "system" | "user" | "assistant", "content": text, "images": [...]}``
                (images on user turns, before their text), or ``Turn``; the last is the user's.
            decoding: the other arguments of ``answer`` (sampling, streamer, stop ids, logits).
        """
        out = ConversationPipeline(self)(messages, max_new_tokens, **decoding)
        return out if return_dict or decoding.get("output_logits") else out.text

    def generate_report(self, image: ImageInput, prompt: str | None = None, modality: str | None = None,
                        max_new_tokens: int = DECODING.max_new_tokens, **decoding) -> str | TextOutput:
        """Draft a report for an image; the prompt names the modality when known (DICOM Modality).
        ``decoding`` takes the other arguments of ``answer``."""
        if prompt is None:
            if modality is None:
                image = read_image(image)
                modality = image.modality
            prompt = report_prompt(modality)
        return self.answer(image, prompt, max_new_tokens=max_new_tokens, **decoding)

    def answer_batch(self, images: Sequence[ImageInput | Sequence[ImageInput]], questions: Sequence[str],
                     batch_size: int | None = None, max_new_tokens: int = DECODING.max_new_tokens,
                     do_sample: bool = DECODING.do_sample, temperature: float = DECODING.temperature,
                     top_p: float = DECODING.top_p, stop_token_ids: Sequence[int] | None = None,
                     generator: torch.Generator | None = None) -> list[str]:
        """Answer many (image, question) pairs, ``batch_size`` at a time (all at once by default), decoding
        each batch's rows together. Greedy answers equal ``answer`` one by one; with sampling, the rows of a
        batch draw from ``generator`` together."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        requests = [(list(i) if isinstance(i, (list, tuple)) else [i], q) for i, q in zip(images, questions)]
        size = batch_size or len(requests) or 1
        answers: list[str] = []
        for start in range(0, len(requests), size):
            outputs = UnderstandingPipeline(self).batch(requests[start:start + size], max_new_tokens, do_sample,
                                                        temperature, top_p, stop_token_ids, generator)
            answers += [out.text for out in outputs]
        return answers

    def generate_reports(self, images: Sequence[ImageInput], prompts: Sequence[str | None] | None = None,
                         modalities: Sequence[str | None] | None = None, batch_size: int | None = None,
                         max_new_tokens: int = DECODING.max_new_tokens, **decoding) -> list[str]:
        """Draft a report for each image, decoding them together (``answer_batch``); each prompt names its
        image's modality when known. ``decoding`` takes the other arguments of ``answer_batch``."""
        loaded = [read_image(image) for image in images]
        prompts = list(prompts) if prompts is not None else [None] * len(loaded)
        modalities = list(modalities) if modalities is not None else [m.modality for m in loaded]
        texts = [p or report_prompt(m) for p, m in zip(prompts, modalities)]
        return self.answer_batch(loaded, texts, batch_size=batch_size, max_new_tokens=max_new_tokens, **decoding)

    # ----- generation -----

    def generate_image(self, prompt: str | Sequence[str], height: int | None = None, width: int | None = None,
                       num_inference_steps: int = T2I.num_inference_steps, cfg_text_scale: float = T2I.cfg_text_scale,
                       cfg_img_scale: float = T2I.cfg_img_scale, cfg_interval: tuple[float, float] = T2I.cfg_interval,
                       timestep_shift: float = T2I.timestep_shift, cfg_renorm_type: str = T2I.cfg_renorm_type,
                       cfg_renorm_min: float = T2I.cfg_renorm_min,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None,
                       latents: torch.Tensor | None = None, output_type: str = "pil", progress: bool | None = None,
                       callback: Callback | None = None, num_images_per_prompt: int = 1,
                       batch_size: int | None = None):
        """Text-to-image. The default 49 steps is the published 50-timestep schedule (docs/sampling.md).

        Args:
            prompt: one prompt, or a list; several images are generated together (docs/sampling.md#batched-requests).
            height, width: output size, multiples of 16 up to ``max_latent_size * 16`` (1024 for the
                released model; its default).
            generator, latents: the initial noise is ``latents`` (shape (z_channels, H/8, W/8), or (N, ...)
                for N images) or drawn from ``generator``: a list gives image k the k-th generator; one
                generator is drawn from image after image, so image k is the k-th of N single calls with it.
            output_type: ``"pil"`` (labelled synthetic), ``"np"`` (uint8 HxWx3), ``"pt"`` (uint8 3xHxW) or
                ``"latent"`` (the final VAE latents, (z_channels, H/8, W/8)).
            callback: called as ``callback(step, total)`` after each step; raise inside it to cancel.
            num_images_per_prompt: images of each prompt, consecutive in the output (prompt 0's first).
            batch_size: the most images per forward (default: all of them).

        Returns one image for one prompt string and one image per prompt, else a list of N images.
        """
        settings = GuidanceSettings(num_inference_steps, cfg_text_scale, cfg_img_scale, tuple(cfg_interval),
                                    timestep_shift, cfg_renorm_type, cfg_renorm_min)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        images = TextToImagePipeline(self).batch(prompts, height, width, settings, generator, latents, output_type,
                                                 progress, callback, batch_size)
        return images[0] if isinstance(prompt, str) and num_images_per_prompt == 1 else images

    def edit_image(self, image: ImageInput | list[ImageInput], instruction: str | Sequence[str],
                   height: int | Sequence[int] | None = None, width: int | Sequence[int] | None = None,
                   num_inference_steps: int = EDIT.num_inference_steps, cfg_text_scale: float = EDIT.cfg_text_scale,
                   cfg_img_scale: float = EDIT.cfg_img_scale, cfg_interval: tuple[float, float] = EDIT.cfg_interval,
                   timestep_shift: float = EDIT.timestep_shift, cfg_renorm_type: str = EDIT.cfg_renorm_type,
                   cfg_renorm_min: float = EDIT.cfg_renorm_min,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None,
                   latents: torch.Tensor | Sequence[torch.Tensor] | None = None, vae_posterior: str = "mean",
                   analyze_first: bool = False, output_type: str = "pil", progress: bool | None = None,
                   callback: Callback | None = None, task: str = "image-to-image", batch_size: int | None = None,
                   tiling: str = WHOLE, tile_overlap: float = DEFAULT_TILE_OVERLAP):
        """Image-to-image from an instruction, at any size up to 4096 px per side (docs/tiling.md). The output
        is ``height`` x ``width``, by default the input's size. Defaults follow the released editing script.

        Args:
            image, instruction: one input, or a list of images (a list of instructions, one per image, or one
                for all); inputs of the same output size are edited together, at most ``batch_size`` per
                forward, and a list of images gives a list of outputs (docs/sampling.md#batched-requests).
            height, width, latents, generator: one for all inputs or one per input (``latents`` (N, z, H/8,
                W/8) or a list); one generator is drawn from input after input, as N single calls would.
            vae_posterior: ``"mean"`` (deterministic, default) or ``"sample"`` (as the reference does) for
                encoding the input image.
            analyze_first: first let the model describe an editing strategy and append it to the
                instruction (the editing script's describe-first variant).
            task: the task name written into the output's synthetic labels.
            tiling: ``"whole"`` (default: the model edits the input at the size it makes, when the requested
                size is not one, and the result is resized to it) or ``"tiled"`` (overlapping tiles of the
                model's side, edited with noise seeded per tile from ``generator`` and blended; at most
                ``batch_size`` tiles per forward, 8 by default). An input the model makes in one go runs as
                before. ``latents`` fix the generation size (the output is then that size, untiled).
            tile_overlap: fraction of the tile side that neighbouring tiles share (0 to 0.5).
        """
        settings = GuidanceSettings(num_inference_steps, cfg_text_scale, cfg_img_scale, tuple(cfg_interval),
                                    timestep_shift, cfg_renorm_type, cfg_renorm_min)
        many = isinstance(image, (list, tuple))
        if not many and latents is not None:
            latents = [latents]
        out = AnySizeEditing(self).batch(list(image) if many else [image], instruction, height, width, settings,
                                         generator, latents, vae_posterior, analyze_first, output_type, progress,
                                         callback, task, batch_size=batch_size, tiling=tiling,
                                         tile_overlap=tile_overlap)
        return out if many else out[0]

    # ----- named image-to-image tasks (``edit`` arguments pass through) -----

    def super_resolve(self, image: ImageInput | list[ImageInput], scale: int = 4,
                      instruction: str | Sequence[str] | None = None, *, tiling: str = TILED,
                      tile_overlap: float = DEFAULT_TILE_OVERLAP, **edit_args: Unpack[EditArgs]):
        """x2/x4 super-resolution: the input is upsampled (bicubic) to exactly ``scale`` times its size (at
        most 4096 px per side), and the model restores detail tile by tile (``tiling="tiled"``, the default)
        or on the whole image at its own size (``"whole"``). A list of images gives a list of outputs."""
        if scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, got {scale}")

        def upsample(one: ImageInput) -> tuple[Image.Image, str | None]:
            loaded = read_image(one)
            pil = loaded.to_pil()
            target = (pil.width * scale, pil.height * scale)
            if max(target) > MAX_OUTPUT_SIDE:
                raise ValueError(f"a {pil.width}x{pil.height} input upscaled {scale}x exceeds the largest output "
                                 f"side ({MAX_OUTPUT_SIDE}); crop or downsample it first")
            return pil.resize(target, Image.Resampling.BICUBIC), loaded.modality

        many = isinstance(image, (list, tuple))
        inputs = [upsample(one) for one in (image if many else [image])]
        edit_args.setdefault("height", [up.height for up, _ in inputs])
        edit_args.setdefault("width", [up.width for up, _ in inputs])
        if instruction is None:
            instruction = [super_resolution_instruction(scale, modality) for _, modality in inputs]
        out = self.edit_image([up for up, _ in inputs], instruction, task="super-resolution", tiling=tiling,
                              tile_overlap=tile_overlap, **edit_args)
        return out if many else out[0]

    def virtual_stain(self, image: ImageInput | list[ImageInput], stain: str = "IHC",
                      instruction: str | Sequence[str] | None = None, *, tiling: str = TILED,
                      tile_overlap: float = DEFAULT_TILE_OVERLAP, **edit_args: Unpack[EditArgs]):
        """Virtual staining of an H&E pathology image (to IHC by default), tiled by default; a list of images
        gives a list."""
        return self.edit_image(image, instruction or staining_instruction(stain), task="virtual-staining",
                               tiling=tiling, tile_overlap=tile_overlap, **edit_args)

    def translate_contrast(self, image: ImageInput | list[ImageInput], source: str = "T2", target: str = "FLAIR",
                           instruction: str | Sequence[str] | None = None, *, tiling: str = TILED,
                           tile_overlap: float = DEFAULT_TILE_OVERLAP, **edit_args: Unpack[EditArgs]):
        """MRI contrast translation, e.g. T2 -> FLAIR or FLAIR -> T2, tiled by default; a list of images gives
        a list."""
        return self.edit_image(image, instruction or translation_instruction(source, target),
                               task="contrast-translation", tiling=tiling, tile_overlap=tile_overlap, **edit_args)

    def counterfactual_edit(self, image: ImageInput | list[ImageInput], instruction: str | Sequence[str],
                            max_explanation_tokens: int = EXPLANATION_TOKENS, *, tiling: str = WHOLE,
                            tile_overlap: float = DEFAULT_TILE_OVERLAP,
                            **edit_args: Unpack[EditArgs]) -> CounterfactualResult | list[CounterfactualResult]:
        """A counterfactual edit (e.g. "remove the pleural effusion") and the model's explanation text; a list
        of images gives a list of results. Whole-image by default (the edit needs the global context); tiled,
        the explanation is the whole input's."""
        unknown = set(edit_args) - set(EditArgs.__annotations__)
        if unknown:
            raise TypeError(f"counterfactual_edit got unexpected arguments {sorted(unknown)}")
        guidance = {k: v for k, v in edit_args.items() if k in _GUIDANCE_FIELDS}
        if "cfg_interval" in guidance:
            guidance["cfg_interval"] = tuple(guidance["cfg_interval"])
        rest = {k: v for k, v in edit_args.items() if k not in _GUIDANCE_FIELDS}
        many = isinstance(image, (list, tuple))
        if not many and rest.get("latents") is not None:
            rest["latents"] = [rest["latents"]]
        out = AnySizeEditing(self).batch(list(image) if many else [image], instruction,
                                         settings=replace(EDIT, **guidance), task="counterfactual",
                                         explain_tokens=max_explanation_tokens, tiling=tiling,
                                         tile_overlap=tile_overlap, **rest)
        results = [CounterfactualResult(image_out, text) for image_out, text in out]
        return results if many else results[0]
