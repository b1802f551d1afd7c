"""Autoregressive decoding over a context (the reference's ``gen_text``, docs/token-layout.md#decoding), with a
preallocated cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..modeling.qwen2_mot import ExpertRouting
from ..modeling.tokenizer import IM_END, IM_START
from .context import Context

__all__ = ["TextOutput", "DecodingSettings", "DECODING", "EXPLANATION_TOKENS", "ANALYSIS_TOKENS", "decode_text",
           "select_token"]


@dataclass(frozen=True)
class DecodingSettings:
    """Defaults for answers and reports: greedy decoding, at most 512 new tokens (the released VQA script)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


DECODING = DecodingSettings()
# A counterfactual edit's explanation, and the editing script's analyse-first pass (800 tokens there).
EXPLANATION_TOKENS = 256
ANALYSIS_TOKENS = 800


@dataclass
class TextOutput:
    text: str
    token_ids: list[int]
    # One row per lm_head call (the logits that chose token_ids[i]); only when asked for.
    logits: torch.Tensor | None = None
    stopped_by: str = "length"  # "stop_token" or "length"
    extras: dict = field(default_factory=dict)


def select_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> int:
    if not do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    gen_device = generator.device if generator is not None else probs.device
    return int(torch.multinomial(probs.to(gen_device), 1, generator=generator))


def decode_text(context: Context, prompt_ids: list[int] | None, tokenizer, max_new_tokens: int,
                do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                stop_token_ids: Sequence[int] | None = None, streamer: Callable[[str], None] | None = None,
                generator: torch.Generator | None = None, output_logits: bool = False) -> TextOutput:
    """Decode from ``<|im_start|>``. If ``prompt_ids`` is given, that text block and the start token run in
    one forward. The context must have room for the prompt block, 1 start token and max_new_tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    special = context.special
    stops = set(stop_token_ids) if stop_token_ids is not None else {special.im_end}
    model = context.model
    if prompt_ids is not None:
        hidden = context.add_text(prompt_ids, extra_ids=[special.im_start])
        position = context.rope
    else:
        start = model.embed_tokens(torch.tensor([special.im_start], device=context.device))
        hidden = context.run(start, torch.tensor([context.rope], device=context.device),
                             ExpertRouting.understanding(), causal=True)[-1]
        position = context.rope + 1
    ids: list[int] = []
    rows = []
    emitted = ""
    stopped_by = "length"
    for step in range(max_new_tokens):
        logits = model.text_logits(hidden).float()
        if output_logits:
            rows.append(logits.detach().cpu())
        token = select_token(logits, do_sample, temperature, top_p, generator)
        if token in stops:
            stopped_by = "stop_token"
            break
        ids.append(token)
        if streamer is not None:
            text = tokenizer.decode(ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                streamer(text[len(emitted):])
                emitted = text
        if step + 1 == max_new_tokens:
            break
        embeds = model.embed_tokens(torch.tensor([token], device=context.device))
        hidden = context.run(embeds, torch.tensor([position], device=context.device),
                             ExpertRouting.understanding(), causal=True)[-1]
        position += 1
    text = _final_text(tokenizer, special.im_start, ids)
    if streamer is not None and text.startswith(emitted) and len(text) > len(emitted):
        streamer(text[len(emitted):])
    return TextOutput(text=text, token_ids=ids, logits=torch.stack(rows) if rows else None, stopped_by=stopped_by)


def _final_text(tokenizer, im_start: int, ids: list[int]) -> str:
    """The reference decodes <|im_start|> + ids, cuts at the first <|im_end|>, keeps what follows the first
    <|im_start|> and before any later one."""
    text = tokenizer.decode([im_start, *ids])
    return text.split(IM_END)[0].split(IM_START)[1]
