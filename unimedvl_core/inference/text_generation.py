"""Autoregressive decoding over a context (the reference's ``gen_text``, docs/token-layout.md#decoding), with a
preallocated cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..modeling.qwen2_mot import ExpertRouting
from ..modeling.tokenizer import IM_END, IM_START
from .context import Context
from .decoding import choose_tokens, decode_rows, decode_step_for

__all__ = ["TextOutput", "DecodingSettings", "DECODING", "EXPLANATION_TOKENS", "ANALYSIS_TOKENS", "decode_text",
           "check_decoding", "start_decoding", "final_text"]


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


def check_decoding(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def start_decoding(context: Context, prompt_ids: list[int] | None) -> tuple[torch.Tensor, int]:
    """Run the prompt's last text block (if any) and the ``<|im_start|>`` that decoding starts from; returns
    the logits of the first token and its rope position."""
    special, model = context.special, context.model
    if prompt_ids is not None:
        hidden = context.add_text(prompt_ids, extra_ids=[special.im_start])
    else:
        start = model.embed_tokens(torch.tensor([special.im_start], device=context.device))
        hidden = context.run(start, torch.tensor([context.rope], device=context.device),
                             ExpertRouting.understanding(), causal=True)[-1]
        context.layout.tokens(1)
    return model.text_logits(hidden).float(), context.rope


class _Streamer:
    """Hands the decoded text out piece by piece, never half a multi-byte character."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: list[int] = []
        self.emitted = ""

    def __call__(self, tokens: torch.Tensor, stops: set[int]) -> None:
        token = int(tokens[0])
        if token in stops or (self.ids and self.ids[-1] in stops):
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.callback(text[len(self.emitted):])
            self.emitted = text

    def finish(self, text: str) -> None:
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.callback(text[len(self.emitted):])


def decode_text(context: Context, prompt_ids: list[int] | None, tokenizer, max_new_tokens: int,
                do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                stop_token_ids: Sequence[int] | None = None, streamer: Callable[[str], None] | None = None,
                generator: torch.Generator | None = None, output_logits: bool = False) -> TextOutput:
    """Decode from ``<|im_start|>``. If ``prompt_ids`` is given, that text block and the start token run in
    one forward. The context must have room for the prompt block, 1 start token and max_new_tokens."""
    check_decoding(max_new_tokens, do_sample, temperature, top_p)
    stops = list(stop_token_ids) if stop_token_ids is not None else [context.special.im_end]
    first_logits, position = start_decoding(context, prompt_ids)
    step = decode_step_for(context.model, [(context.cache, 0, context.length)], max_new_tokens)
    stream = _Streamer(tokenizer, streamer) if streamer is not None else None
    result = decode_rows(step, first_logits[None], torch.tensor([position], device=context.device), max_new_tokens,
                         stops, lambda logits: choose_tokens(logits, do_sample, temperature, top_p, generator),
                         (lambda tokens: stream(tokens, set(stops))) if stream else None, output_logits)
    ids = result.token_ids[0]
    text = final_text(tokenizer, context.special.im_start, ids)
    if stream is not None:
        stream.finish(text)
    return TextOutput(text=text, token_ids=ids, logits=result.logits[0] if output_logits else None,
                      stopped_by="stop_token" if result.stopped[0] else "length")


def final_text(tokenizer, im_start: int, ids: list[int]) -> str:
    """The reference decodes <|im_start|> + ids, cuts at the first <|im_end|>, keeps what follows the first
    <|im_start|> and before any later one."""
    text = tokenizer.decode([im_start, *ids])
    return text.split(IM_END)[0].split(IM_START)[1]
