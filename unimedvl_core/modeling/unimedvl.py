"""The UniMedVL network: composition of the LLM, ViT and the small heads.

Its state dict is exactly the key set of ``ema.safetensors``; the VAE, whose weights live in
``ae.safetensors``, is a separate diffusers module held next to it. This module holds the math only: how
each kind of token is embedded and how a sequence (a KV-cache block or a training pack) runs through the
mixture-of-transformers, with the layout of docs/token-layout.md. Prompt
framing, caches and samplers live in ``unimedvl_core.inference``; the user-facing API is
``unimedvl_core.UniMedVL``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import DenseAttention
from .config import UniMedVLConfig
from .embeddings import MLPConnector, PositionEmbedding, TimestepEmbedder, grid_position_ids
from .flow_matching import velocity_loss_sum
from .qwen2_mot import ExpertRouting, Qwen2MoTForCausalLM
from .siglip_navit import SiglipNaViTModel

if TYPE_CHECKING:
    from .packing import Pack

__all__ = ["UniMedVLModel"]


class UniMedVLModel(nn.Module):
    def __init__(self, config: UniMedVLConfig):
        super().__init__()
        self.config = config
        llm_cfg = config.qwen2_config()
        vit_cfg = config.siglip_config()
        hidden = llm_cfg.hidden_size
        self.language_model = Qwen2MoTForCausalLM(llm_cfg)
        self.vit_model = SiglipNaViTModel(vit_cfg, config.vit_max_num_patch_per_side)
        self.connector = MLPConnector(vit_cfg.hidden_size, hidden, config.connector_act)
        self.vit_pos_embed = PositionEmbedding(config.vit_max_num_patch_per_side, hidden)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(config.max_latent_size, hidden)

    def init_weights(self, seed: int | None = None, zero_llm2vae: bool = True) -> None:
        """Random initialisation as in Qwen2/Bagel: normal(0, initializer_range) linears and embeddings,
        unit norms, sin-cos position tables, zero ``llm2vae`` (a fresh generator predicts zero velocity)."""
        std = float(self.config.llm.get("initializer_range", 0.02))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
                elif hasattr(module, "variance_epsilon"):  # Qwen2RMSNorm
                    module.weight.fill_(1.0)
            self.vit_pos_embed.reset_table()
            self.latent_pos_embed.reset_table()
            if zero_llm2vae:
                self.llm2vae.weight.zero_()
                self.llm2vae.bias.zero_()

    # ----- token embeddings -----
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    def embed_vit_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """(3, H, W) images in [-1, 1] -> one (N_i, hidden) tensor of ViT tokens per image."""
        features = self.vit_model(images)
        p = self.config.vit_patch_size
        out = []
        for image, feat in zip(images, features):
            pos = grid_position_ids(image.shape[1] // p, image.shape[2] // p, self.config.vit_max_num_patch_per_side,
                                    feat.device)
            out.append(self.connector(feat) + self.vit_pos_embed(pos))
        return out

    def latent_position_ids(self, h: int, w: int, device=None) -> torch.Tensor:
        return grid_position_ids(h, w, self.config.max_latent_size, device)

    def embed_latent_tokens(self, tokens: torch.Tensor, timesteps: torch.Tensor,
                            position_ids: torch.Tensor) -> torch.Tensor:
        """Latent tokens (N, p*p*z) at flow times t (N,) -> vae2llm(x) + time(t) + pos."""
        x = self.vae2llm(tokens.to(self.vae2llm.weight.dtype))
        return x + self.time_embedder(timesteps) + self.latent_pos_embed(position_ids)

    # ----- the transformer over a sequence -----
    def run_llm(self, embeds: torch.Tensor, position_ids: torch.Tensor, routing: ExpertRouting,
                attend, outputs: int | None = None) -> torch.Tensor:
        """Final hidden states of every row, or of the last ``outputs`` rows (``Qwen2MoTModel.forward``)."""
        return self.language_model.model(embeds, position_ids, routing, attend, outputs=outputs)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states of latent tokens -> predicted velocity eps - x0."""
        return self.llm2vae(hidden)

    # ----- packed sequences (training, and tests recomputing inference in one pass) -----
    def embed_pack(self, pack: Pack, vae_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (L, H) of a pack. ``vae_inputs`` are the latent tokens as the model sees them
        (x_t for noisy targets); by default the pack's clean tokens."""
        device = self.embed_tokens.weight.device
        embeds = self.embed_tokens(pack.text_ids.to(device))
        out = embeds.new_zeros(pack.length, embeds.shape[-1])
        out[pack.text_index.to(device)] = embeds
        if pack.vit_images:
            vit = self.embed_vit_images([img.to(device, embeds.dtype) for img in pack.vit_images])
            out[pack.vit_index.to(device)] = torch.cat(vit).to(out.dtype)
        if len(pack.vae_index):
            tokens = pack.vae_tokens if vae_inputs is None else vae_inputs
            lat = self.embed_latent_tokens(tokens.to(device), pack.vae_timesteps.to(device),
                                           pack.vae_position_ids.to(device))
            out[pack.vae_index.to(device)] = lat.to(out.dtype)
        return out

    def forward_pack(self, pack: Pack, vae_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (L, H) of a pack in one dense forward with the pack's attention mask."""
        device = self.embed_tokens.weight.device
        embeds = self.embed_pack(pack, vae_inputs)
        routing = ExpertRouting.from_gen_mask(pack.gen_mask(device))
        mask = pack.attention_mask(embeds.dtype, device)
        hidden = self.run_llm(embeds[None], pack.position_ids.to(device)[None], routing, DenseAttention(mask))
        return hidden[0]

    # ----- training -----
    def forward(self, pack: Pack, vae_inputs: torch.Tensor, velocity_target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses of one packed sequence (docs/training.md), as sums over supervised tokens; the training
        entry point, so that data-parallel wrappers see it.

        Args:
            pack: a ``unimedvl_core.modeling.packing.Pack``.
            vae_inputs: latent tokens as the model sees them (x_t for targets, clean for conditions).
            velocity_target: eps - x0 for the supervised (noisy) latent tokens, in ``pack.mse_index`` order.
        Returns ``ce_sum`` (summed next-token cross-entropy) and ``mse_sum`` (per-token mean squared velocity
        error, summed over tokens); the caller normalises by the global token counts.
        """
        hidden = self.forward_pack(pack, vae_inputs)
        device = hidden.device
        if len(pack.ce_index):
            logits = self.text_logits(hidden[pack.ce_index.to(device)]).float()
            ce_sum = F.cross_entropy(logits, pack.ce_labels.to(device), reduction="sum")
        else:
            ce_sum = hidden.new_zeros(()).float()
        if len(pack.mse_index):
            rows = pack.vae_index[pack.mse_index].to(device)
            mse_sum = velocity_loss_sum(self.velocity(hidden[rows]), velocity_target)
        else:
            mse_sum = hidden.new_zeros(()).float()
        return {"ce_sum": ce_sum, "mse_sum": mse_sum}
