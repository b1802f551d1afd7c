"""Multi-turn understanding: a conversation's earlier turns are held in the context, so a follow-up question
("and on the left?") is read with the images, questions and answers before it.

Each turn becomes the blocks a single-turn answer uses (docs/token-layout.md#conversations): a system turn
is one text block; a user turn is its image blocks, then its text block; an assistant turn is its text
block, the same ``<|im_start|> text <|im_end|>`` the model wrote when it decoded that answer. The last turn
is the user's, and decoding starts after it. A one-turn conversation is exactly ``UniMedVL.answer``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..modeling.layout import TokenLayout
from .components import Components
from .context import Context
from .text_generation import DECODING, TextOutput, decode_text
from .understanding import vit_input, vit_token_count

__all__ = ["Turn", "ROLES", "as_turns", "ConversationPipeline"]

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One message: who says it, its text and (user turns only) its images, in order before the text."""

    role: str
    text: str
    images: tuple = ()


def _turn(index: int, message: Turn | Mapping) -> Turn:
    if isinstance(message, Turn):
        turn = message
    elif isinstance(message, Mapping):
        images = message.get("images") or ()
        turn = Turn(message.get("role", ""), message.get("content", ""), tuple(images))
    else:
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    if turn.role not in ROLES:
        raise ValueError(f"message {index}: role must be one of {', '.join(ROLES)}, got {turn.role!r}")
    if not isinstance(turn.text, str) or not turn.text.strip():
        raise ValueError(f"message {index} ({turn.role}): content must be non-empty text")
    if turn.images and turn.role != "user":
        raise ValueError(f"message {index} ({turn.role}): only user messages carry images")
    return turn


def as_turns(messages: Sequence[Turn | Mapping]) -> list[Turn]:
    """Check a conversation: roles known, texts non-empty, images on user turns only, the last turn the
    user's, a system turn only first."""
    turns = [_turn(i, m) for i, m in enumerate(messages)]
    if not turns or turns[-1].role != "user":
        raise ValueError("a conversation must end with a user message")
    if any(t.role == "system" for t in turns[1:]):
        raise ValueError("a system message may only come first")
    return turns


class ConversationPipeline:
    """Prefill every turn but the last's text, then decode the answer to the last user message."""

    def __init__(self, parts: Components):
        self.parts = parts

    def _blocks(self, turns: list[Turn]) -> list[tuple[str, object]]:
        """("image", ViT tensor) and ("text", ids) blocks in context order."""
        rule = self.parts.config.transforms.vqa_vit
        blocks: list[tuple[str, object]] = []
        for turn in turns:
            blocks += [("image", vit_input(image, rule)) for image in turn.images]
            blocks.append(("text", self.parts.encode_text(turn.text)))
        return blocks

    def _context(self, blocks: list[tuple[str, object]], max_new_tokens: int) -> Context:
        texts = [len(ids) for kind, ids in blocks if kind == "text"]
        images = [vit_token_count(self.parts, t) for kind, t in blocks if kind == "image"]
        capacity = TokenLayout.planned_length(text=texts, images=images, extra=1 + max_new_tokens)
        limit = self.parts.model.language_model.config.max_position_embeddings
        if capacity > limit:  # the cache is allocated for the whole conversation up front
            raise ValueError(f"the conversation needs {capacity} tokens with its answer, more than the model's "
                             f"context of {limit}; drop earlier turns or images")
        context = Context(self.parts.model, self.parts.special, capacity)
        for kind, value in blocks[:-1]:
            if kind == "image":
                context.add_vit_image(value)
            else:
                context.add_text(value)
        return context

    @torch.inference_mode()
    def __call__(self, messages: Sequence[Turn | Mapping], max_new_tokens: int = DECODING.max_new_tokens,
                 do_sample: bool = DECODING.do_sample, temperature: float = DECODING.temperature,
                 top_p: float = DECODING.top_p, stop_token_ids: Sequence[int] | None = None,
                 streamer: Callable[[str], None] | None = None, generator: torch.Generator | None = None,
                 output_logits: bool = False) -> TextOutput:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        blocks = self._blocks(as_turns(messages))
        context = self._context(blocks, max_new_tokens)
        return decode_text(context, blocks[-1][1], self.parts.tokenizer, max_new_tokens, do_sample, temperature,
                           top_p, stop_token_ids, streamer, generator, output_logits)
