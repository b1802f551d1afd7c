"""Packed sequences: several samples, each a list of text / ViT-image / VAE-image blocks, laid out in one
sequence with the position ids and the attention rules of docs/token-layout.md, expert routing, and the
positions supervised by the text (CE) and velocity (MSE) losses (docs/training.md).

Training builds packs from data; tests build them to recompute, in one dense forward
(``UniMedVLModel.forward_pack``), what inference computes block by block through the KV cache. Block sizes
and positions come from ``TokenLayout``, as in inference contexts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import SPLIT_CAUSAL, SPLIT_FULL, SPLIT_NOISE, additive_mask, block_diagonal, packed_attention_mask
from .layout import TokenLayout, text_block_ids
from .tokenizer import SpecialTokenIds

__all__ = ["PackBuilder", "Pack"]


@dataclass
class Pack:
    length: int
    position_ids: torch.Tensor          # (L,)
    text_ids: torch.Tensor              # ids at text_index (text tokens and vision markers)
    text_index: torch.Tensor
    vit_images: list[torch.Tensor]      # (3, H, W) in [-1, 1]
    vit_index: torch.Tensor             # positions of all ViT tokens, image after image
    vae_tokens: torch.Tensor            # clean latent tokens (N, p*p*z) of every VAE block, concatenated
    vae_index: torch.Tensor
    vae_position_ids: torch.Tensor      # latent grid ids of those tokens
    vae_timesteps: torch.Tensor         # flow time per latent token (0 = clean condition)
    mse_index: torch.Tensor             # which of the latent tokens are supervised (noisy targets), into vae_*
    ce_index: torch.Tensor              # positions whose next-token prediction is supervised
    ce_labels: torch.Tensor
    split_lens: list[list[int]]         # per sample
    split_modes: list[list[str]]
    vae_shapes: list[tuple[int, int]] = field(default_factory=list)

    def attention_mask(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        masks = [packed_attention_mask(lens, modes, device) for lens, modes in zip(self.split_lens, self.split_modes)]
        return additive_mask(block_diagonal(masks), dtype)[None, None]

    def gen_mask(self, device=None) -> torch.Tensor:
        mask = torch.zeros(self.length, dtype=torch.bool, device=device)
        mask[self.vae_index.to(device)] = True
        return mask


class PackBuilder:
    """Lay out samples block by block; ``TokenLayout`` gives each block's rope positions (a noisy VAE
    block does not advance them: the next block reuses its position, docs/token-layout.md)."""

    def __init__(self, special: SpecialTokenIds):
        self.special = special
        self.layout = TokenLayout()
        self.positions: list[int] = []
        self.text_ids: list[int] = []
        self.text_index: list[int] = []
        self.vit_images: list[torch.Tensor] = []
        self.vit_index: list[int] = []
        self.vae_tokens: list[torch.Tensor] = []
        self.vae_index: list[int] = []
        self.vae_pos: list[torch.Tensor] = []
        self.vae_t: list[torch.Tensor] = []
        self.mse: list[int] = []
        self.ce_index: list[int] = []
        self.ce_labels: list[int] = []
        self.split_lens: list[list[int]] = []
        self.split_modes: list[list[str]] = []
        self.vae_shapes: list[tuple[int, int]] = []
        self._latent_count = 0

    @property
    def length(self) -> int:
        return len(self.positions)

    @property
    def rope(self) -> int:
        """The rope position of the next block of the current sample."""
        return self.layout.rope

    def start_sample(self) -> None:
        self.split_lens.append([])
        self.split_modes.append([])
        self.layout.restart()

    def _split(self, length: int, mode: str) -> None:
        if not self.split_lens:  # a builder's first sample may start without start_sample()
            self.split_lens.append([])
            self.split_modes.append([])
        self.split_lens[-1].append(length)
        self.split_modes[-1].append(mode)

    def _text_tokens(self, tokens: list[int], positions) -> None:
        self.text_index.extend(range(self.length, self.length + len(tokens)))
        self.text_ids.extend(tokens)
        self.positions.extend(positions)

    def _image_block(self, positions: list[int]) -> range:
        """The markers and position ids of an image block; returns where its image tokens go."""
        n = len(positions) - 2
        self._text_tokens([self.special.vision_start], positions[:1])
        index = range(self.length, self.length + n)
        self.positions.extend(positions[1:-1])
        self._text_tokens([self.special.vision_end], positions[-1:])
        return index

    def add_text(self, ids: list[int], loss: bool = False) -> None:
        """``<|im_start|> ids <|im_end|>``; with ``loss`` each position predicts the next of ids + eos."""
        block = text_block_ids(ids, self.special)
        start = self.length
        self._text_tokens(block, self.layout.text(len(ids)))
        if loss:
            targets = block[1:]
            self.ce_index.extend(range(start, start + len(targets)))
            self.ce_labels.extend(targets)
        self._split(len(block), SPLIT_CAUSAL)

    def add_open_text(self, ids: list[int]) -> None:
        """Tokens of a text block still being written (e.g. ``<|im_start|>`` and decoded ids), no end marker."""
        self._text_tokens(list(ids), self.layout.tokens(len(ids)))
        self._split(len(ids), SPLIT_CAUSAL)

    def add_vit_image(self, image: torch.Tensor, patch_size: int) -> None:
        n = (image.shape[1] // patch_size) * (image.shape[2] // patch_size)
        self.vit_index.extend(self._image_block(self.layout.image(n)))
        self.vit_images.append(image)
        self._split(n + 2, SPLIT_FULL)

    def skip_image(self) -> None:
        """An image dropped for guidance training still takes its position (docs/training.md)."""
        if not self.split_lens:
            self.start_sample()
        self.layout.skip()

    def add_vae_image(self, tokens: torch.Tensor | None, h: int, w: int, position_ids: torch.Tensor,
                      timestep: float = 0.0) -> None:
        """Latent tokens (h*w, p*p*z) of an image: a clean condition at ``timestep`` 0, else a noisy target
        at that flow time (its tokens get the MSE loss; nothing outside the block sees them). ``tokens`` may
        be None when the trainer encodes the pixels later (``Pack.vae_tokens`` is then set by it)."""
        n = h * w
        noisy = timestep > 0
        self.vae_index.extend(self._image_block(self.layout.image(n, advance=not noisy)))
        if tokens is not None:
            self.vae_tokens.append(tokens)
        self.vae_pos.append(position_ids)
        self.vae_t.append(torch.full((n,), float(timestep)))
        if noisy:
            self.mse.extend(range(self._latent_count, self._latent_count + n))
        self._latent_count += n
        self.vae_shapes.append((h, w))
        self._split(n + 2, SPLIT_NOISE if noisy else SPLIT_FULL)

    def build(self) -> Pack:
        def long(values):
            return torch.tensor(values, dtype=torch.long)

        dim = self.vae_tokens[0].shape[1] if self.vae_tokens else 0
        return Pack(
            length=self.length, position_ids=long(self.positions), text_ids=long(self.text_ids),
            text_index=long(self.text_index), vit_images=self.vit_images, vit_index=long(self.vit_index),
            vae_tokens=torch.cat(self.vae_tokens) if self.vae_tokens else torch.zeros(0, dim),
            vae_index=long(self.vae_index),
            vae_position_ids=torch.cat(self.vae_pos) if self.vae_pos else long([]),
            vae_timesteps=torch.cat(self.vae_t) if self.vae_t else torch.zeros(0),
            mse_index=long(self.mse), ce_index=long(self.ce_index), ce_labels=long(self.ce_labels),
            split_lens=self.split_lens, split_modes=self.split_modes, vae_shapes=self.vae_shapes,
        )
