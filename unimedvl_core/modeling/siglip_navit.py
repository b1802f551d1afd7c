"""SigLIP vision encoder over native-resolution (NaViT) patch sequences (docs/architecture.md#vit-path).

The encoder layers and the final LayerNorm are transformers' ``SiglipEncoder`` and ``nn.LayerNorm``
(identical numbers, docs/deviations.md#exact-match-choices). The embedding is ours: the released model stores the patch
embedding as a Linear over (row, col, channel)-ordered patch vectors and indexes its learned position table
at r * 70 + c for any image size, which transformers' ``SiglipVisionEmbeddings`` cannot do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .embeddings import grid_position_ids

if TYPE_CHECKING:  # transformers is imported when the encoder is built, not with this module
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

__all__ = ["NaViTEmbeddings", "SiglipNaViTTransformer", "SiglipNaViTModel", "patchify_image"]


def patchify_image(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(3, H, W) -> (H/p * W/p, p*p*3) patch vectors in (row, col, py, px, channel) order."""
    c, h, w = image.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    x = image.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(1, 3, 2, 4, 0).reshape(-1, patch_size * patch_size * c)


class NaViTEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.num_positions = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))
        return embeds + self.position_embedding(position_ids)


class SiglipNaViTTransformer(nn.Module):
    """The ``vision_model`` level of the checkpoint keys."""

    def __init__(self, config: SiglipVisionConfig):
        from transformers.models.siglip.modeling_siglip import SiglipEncoder

        super().__init__()
        self.config = config
        self.embeddings = NaViTEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches: list[torch.Tensor], position_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encode several images, each attending only to itself; returns one (N_i, D) tensor per image."""
        lengths = [p.shape[0] for p in patches]
        embeds = self.embeddings(torch.cat(patches), torch.cat(position_ids))
        if len(patches) == 1:
            hidden = self.encoder(inputs_embeds=embeds[None], attention_mask=None).last_hidden_state[0]
            return [self.post_layernorm(hidden)]
        # A padded batch with a key-padding mask: the same numbers as per-image attention.
        longest = max(lengths)
        batch = embeds.new_zeros(len(lengths), longest, embeds.shape[-1])
        valid = torch.zeros(len(lengths), longest, dtype=torch.bool, device=embeds.device)
        for i, chunk in enumerate(embeds.split(lengths)):
            batch[i, : lengths[i]] = chunk
            valid[i, : lengths[i]] = True
        mask = torch.zeros(valid.shape, dtype=embeds.dtype, device=embeds.device)
        mask.masked_fill_(~valid, torch.finfo(embeds.dtype).min)
        hidden = self.encoder(inputs_embeds=batch, attention_mask=mask[:, None, None, :]).last_hidden_state
        hidden = self.post_layernorm(hidden)
        return [hidden[i, : lengths[i]] for i in range(len(lengths))]


class SiglipNaViTModel(nn.Module):
    """``vit_model`` in the checkpoint: SigLIP with the last layer dropped (config already adjusted)."""

    def __init__(self, config: SiglipVisionConfig, max_patches_per_side: int):
        super().__init__()
        config._attn_implementation = config._attn_implementation or "sdpa"
        self.config = config
        self.max_patches_per_side = max_patches_per_side
        self.vision_model = SiglipNaViTTransformer(config)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """images: list of (3, H, W) tensors in [-1, 1], sides multiples of the patch size."""
        p = self.config.patch_size
        patches = [patchify_image(img, p) for img in images]
        pos = [grid_position_ids(img.shape[1] // p, img.shape[2] // p, self.max_patches_per_side, img.device)
               for img in images]
        return self.vision_model(patches, pos)
