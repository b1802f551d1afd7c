"""Inference contexts: a prompt held as a KV-cache row plus its next rope position (docs/token-layout.md).

A context grows by blocks, each run through the LLM once and cached; ``TokenLayout`` gives their sizes
and positions, the same rules training packs are laid out with:

- text: ``<|im_start|>`` ids ``<|im_end|>`` at consecutive positions, causal, understanding expert;
- ViT image: ``<|vision_start|>`` N tokens ``<|vision_end|>`` at one position, bidirectional, understanding;
- clean VAE image: the same layout with latent tokens on the generation expert (markers on understanding).

The cache is allocated once for the whole planned prompt (``capacity``, see ``Context.capacity_for``);
blocks never reallocate it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..modeling.attention import CachedAttention
from ..modeling.kv_cache import KVCache
from ..modeling.layout import TokenLayout, text_block_ids
from ..modeling.qwen2_mot import ExpertRouting
from ..modeling.tokenizer import SpecialTokenIds
from ..modeling.unimedvl import UniMedVLModel

__all__ = ["Context", "layer_devices", "image_routing"]


def layer_devices(model: UniMedVLModel) -> list[torch.device]:
    """The device each decoder layer computes on (accelerate hooks set it when the model is dispatched)."""
    devices = []
    for layer in model.language_model.model.layers:
        hook = getattr(layer, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is None:  # the first weight on a device (task residency leaves the idle expert on meta)
            device = next((p.device for p in layer.parameters() if not p.is_meta), model.embed_tokens.weight.device)
        devices.append(torch.device(device))
    return devices


class Context:
    def __init__(self, model: UniMedVLModel, special: SpecialTokenIds, capacity: int):
        cfg = model.language_model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.model = model
        self.special = special
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.cache = KVCache(cfg.num_hidden_layers, 1, capacity, cfg.num_key_value_heads, head_dim, self.dtype,
                             layer_devices(model))
        self.layout = TokenLayout()

    @staticmethod
    def capacity_for(text: Sequence[int] = (), images: Sequence[int] = (), decode: int = 0) -> int:
        """KV-cache capacity of a prompt of text blocks of ``text[i]`` ids and image blocks of ``images[i]``
        tokens, plus ``decode`` single tokens run through the cache (decoding start and decoded ids)."""
        return TokenLayout.planned_length(text, images, extra=decode)

    @property
    def length(self) -> int:
        return self.cache.lengths[0]

    @property
    def rope(self) -> int:
        """The rope position of the next block."""
        return self.layout.rope

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.model.embed_tokens(torch.tensor(ids, device=self.device))

    def _positions(self, positions: Sequence[int]) -> torch.Tensor:
        return torch.tensor(positions, dtype=torch.long, device=self.device)

    def run(self, embeds: torch.Tensor, positions: torch.Tensor, routing: ExpertRouting, causal: bool,
            keep: bool = True, outputs: int | None = None) -> torch.Tensor:
        """Run one query block (L, H) against the cache; returns the final hidden states of every row (L, H)
        or of the last ``outputs`` rows (the others are then not computed past their keys and values)."""
        attend = CachedAttention(self.cache, embeds.shape[0], causal)
        hidden = self.model.run_llm(embeds[None], positions[None], routing, attend, outputs)[0]
        if keep:
            self.cache.advance(embeds.shape[0])
        return hidden

    def add_text(self, ids: list[int], extra_ids: list[int] = ()) -> torch.Tensor:
        """Add ``<|im_start|> ids <|im_end|>``, then optionally more ids (e.g. the decoding start token) in
        the same forward; returns the hidden state of the last token."""
        block = [*text_block_ids(ids, self.special), *extra_ids]
        positions = [*self.layout.text(len(ids)), *self.layout.tokens(len(extra_ids))]
        hidden = self.run(self._embed_ids(block), self._positions(positions), ExpertRouting.understanding(),
                          causal=True, outputs=1)
        return hidden[-1]

    def _image_block(self, tokens: torch.Tensor, routing: ExpertRouting) -> None:
        markers = self._embed_ids([self.special.vision_start, self.special.vision_end])
        embeds = torch.cat([markers[:1], tokens.to(markers.dtype), markers[1:]])
        self.run(embeds, self._positions(self.layout.image(tokens.shape[0])), routing, causal=False, outputs=0)

    def add_vit_image(self, image: torch.Tensor) -> None:
        """(3, H, W) in [-1, 1], sides multiples of the ViT patch size."""
        tokens = self.model.embed_vit_images([image.to(self.device, self.dtype)])[0]
        self._image_block(tokens, ExpertRouting.understanding())

    def add_vae_latents(self, latent_tokens: torch.Tensor, h: int, w: int) -> None:
        """Clean latent tokens (h*w, p*p*z) of a condition image, time 0."""
        n = latent_tokens.shape[0]
        pos = self.model.latent_position_ids(h, w, self.device)
        t = torch.zeros(1, device=self.device)
        tokens = self.model.embed_latent_tokens(latent_tokens.to(self.device), t, pos)
        self._image_block(tokens, image_routing(n, self.device))


def image_routing(num_tokens: int, device) -> ExpertRouting:
    """Markers on the understanding expert, the latent tokens between them on the generation expert."""
    return ExpertRouting.image_block(num_tokens, device)
