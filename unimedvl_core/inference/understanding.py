"""Understanding: answer a question about images (the reference's ``chat``; docs/token-layout.md#worked-layouts).

    [ViT block of each image] [<|im_start|> question <|im_end|>] then decode from <|im_start|>
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..io.medical_io import read_image
from ..modeling.layout import TokenLayout
from ..modeling.preprocessing import ResizeRule, resize_to_rule, to_model_tensor
from .components import Components
from .context import Context
from .decoding import choose_tokens, decode_rows, decode_step_for
from .text_generation import DECODING, TextOutput, check_decoding, decode_text, final_text, start_decoding

__all__ = ["UnderstandingPipeline", "vit_input", "vit_token_count"]


def vit_input(image, rule: ResizeRule) -> torch.Tensor:
    """Any image input -> (3, H, W) in [-1, 1] resized by ``rule`` (docs/preprocessing.md#resize-rule)."""
    return to_model_tensor(resize_to_rule(read_image(image).to_pil(), rule))


def vit_token_count(parts: Components, tensor: torch.Tensor) -> int:
    p = parts.config.vit_patch_size
    return (tensor.shape[1] // p) * (tensor.shape[2] // p)


class UnderstandingPipeline:
    """Images and a question in, text out."""

    def __init__(self, parts: Components):
        self.parts = parts

    @staticmethod
    def check_inputs(question: str, max_new_tokens: int) -> None:
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def prepare_images(self, images: Sequence) -> list[torch.Tensor]:
        return [vit_input(img, self.parts.config.transforms.vqa_vit) for img in images]

    def build_context(self, tensors: list[torch.Tensor], question_ids: list[int], max_new_tokens: int) -> Context:
        """The image blocks, with room for the question block, the decoding start and the answer."""
        images = [vit_token_count(self.parts, t) for t in tensors]
        capacity = TokenLayout.planned_length(text=[len(question_ids)], images=images, extra=1 + max_new_tokens)
        context = Context(self.parts.model, self.parts.special, capacity)
        for tensor in tensors:
            context.add_vit_image(tensor)
        return context

    @torch.inference_mode()
    def __call__(self, images: Sequence, question: str, max_new_tokens: int = DECODING.max_new_tokens,
                 do_sample: bool = DECODING.do_sample, temperature: float = DECODING.temperature,
                 top_p: float = DECODING.top_p, stop_token_ids: Sequence[int] | None = None,
                 streamer: Callable[[str], None] | None = None, generator: torch.Generator | None = None,
                 output_logits: bool = False) -> TextOutput:
        self.check_inputs(question, max_new_tokens)
        tensors = self.prepare_images(images)
        ids = self.parts.encode_text(question)
        context = self.build_context(tensors, ids, max_new_tokens)
        return decode_text(context, ids, self.parts.tokenizer, max_new_tokens, do_sample, temperature, top_p,
                           stop_token_ids, streamer, generator, output_logits)

    def prefill(self, images: Sequence, question: str) -> tuple[Context, torch.Tensor, int]:
        """One request's prompt in its own cache, up to the logits of the first answer token."""
        self.check_inputs(question, 1)
        tensors = self.prepare_images(images)
        ids = self.parts.encode_text(question)
        context = self.build_context(tensors, ids, 0)
        logits, position = start_decoding(context, ids)
        return context, logits, position

    @torch.inference_mode()
    def batch(self, requests: Sequence[tuple[Sequence, str]], max_new_tokens: int = DECODING.max_new_tokens,
              do_sample: bool = DECODING.do_sample, temperature: float = DECODING.temperature,
              top_p: float = DECODING.top_p, stop_token_ids: Sequence[int] | None = None,
              generator: torch.Generator | None = None) -> list[TextOutput]:
        """Several (images, question) requests: each prompt is prefilled on its own, then all rows decode
        together, one forward per token for the whole batch. Greedy answers equal one-by-one answers."""
        check_decoding(max_new_tokens, do_sample, temperature, top_p)
        prefilled = [self.prefill(images, question) for images, question in requests]
        step = decode_step_for(self.parts.model, [(ctx.cache, 0, ctx.length) for ctx, _, _ in prefilled],
                               max_new_tokens)
        device = step.cache.device
        positions = torch.tensor([pos for _, _, pos in prefilled], device=device)
        first = torch.stack([logits.to(device) for _, logits, _ in prefilled])
        stops = list(stop_token_ids) if stop_token_ids is not None else [self.parts.special.im_end]
        result = decode_rows(step, first, positions, max_new_tokens, stops,
                             lambda logits: choose_tokens(logits, do_sample, temperature, top_p, generator))
        return [TextOutput(text=final_text(self.parts.tokenizer, self.parts.special.im_start, ids), token_ids=ids,
                           stopped_by="stop_token" if stopped else "length")
                for ids, stopped in zip(result.token_ids, result.stopped)]
