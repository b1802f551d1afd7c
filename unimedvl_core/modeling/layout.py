"""The token layout of a sequence, shared by inference contexts and training packs (docs/token-layout.md).

One place states how many tokens a block takes and which rope positions they get, so the KV-cache
contexts of inference and the packed sequences of training cannot drift apart:

- text: ``<|im_start|>`` ids ``<|im_end|>``, n + 2 tokens at consecutive positions p .. p+n+1; the next
  block starts at p+n+2;
- ViT image, clean VAE (condition) image: ``<|vision_start|>`` N tokens ``<|vision_end|>``, all N + 2
  tokens at the one position p; the next block starts at p+1;
- noisy VAE (generation target) image: the same layout, but training does not advance the position
  after it (inference never caches it: it queries at the context's next position).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import SpecialTokenIds

__all__ = ["text_block_len", "image_block_len", "text_block_ids", "TokenLayout"]


def text_block_len(num_ids: int) -> int:
    """Tokens of a text block of ``num_ids`` ids: the ids between ``<|im_start|>`` and ``<|im_end|>``."""
    return num_ids + 2


def image_block_len(num_tokens: int) -> int:
    """Tokens of an image block of ``num_tokens`` ViT or latent tokens: them between the vision markers."""
    return num_tokens + 2


def text_block_ids(ids: Sequence[int], special: SpecialTokenIds) -> list[int]:
    """The ids of a whole text block: ``[<|im_start|>, *ids, <|im_end|>]``."""
    return [special.im_start, *ids, special.im_end]


class TokenLayout:
    """The next rope position and the number of tokens laid out so far; each method lays out one block
    and returns the rope position of each of its tokens, in order."""

    def __init__(self) -> None:
        self.rope = 0
        self.length = 0

    @staticmethod
    def planned_length(text: Sequence[int] = (), images: Sequence[int] = (), extra: int = 0) -> int:
        """Tokens of a prompt made of text blocks of ``text[i]`` ids, image blocks of ``images[i]``
        tokens and ``extra`` single tokens (decoding start, decoded ids): the KV-cache it needs."""
        return sum(map(text_block_len, text)) + sum(map(image_block_len, images)) + extra

    def tokens(self, count: int) -> range:
        """``count`` tokens at consecutive positions (a text block still being written, decoded ids)."""
        positions = range(self.rope, self.rope + count)
        self.rope += count
        self.length += count
        return positions

    def text(self, num_ids: int) -> range:
        """A text block of ``num_ids`` ids: ``num_ids + 2`` consecutive positions."""
        return self.tokens(text_block_len(num_ids))

    def image(self, num_tokens: int, advance: bool = True) -> list[int]:
        """An image block of ``num_tokens`` tokens, all at one position. ``advance=False`` for a noisy
        target in training: the next block reuses its position."""
        positions = [self.rope] * image_block_len(num_tokens)
        self.length += len(positions)
        if advance:
            self.rope += 1
        return positions

    def skip(self) -> None:
        """An image dropped for guidance training: no tokens, but it still takes its position."""
        self.rope += 1

    def restart(self) -> None:
        """A new sample of a pack: positions start again at 0, tokens keep counting."""
        self.rope = 0
