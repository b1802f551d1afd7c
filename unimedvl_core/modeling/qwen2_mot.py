"""Qwen2 mixture-of-transformers decoder (docs/architecture.md#mot-layer).

Each layer holds two experts with identical shapes: the understanding expert (text and ViT tokens; the
plain Qwen2 names ``q_proj``, ``mlp``, ...) and the generation expert (VAE latent tokens; the same names
with ``_moe_gen``). Both experts attend jointly over the whole sequence. Which rows use which expert is an
``ExpertRouting``; norms, rotary embedding and MLP are the transformers Qwen2 modules, which match the
reference bit for bit (docs/deviations.md#exact-match-choices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# transformers' Qwen2 modules are imported where they are used (building the layers, applying the rotary
# embedding), not with this module: importing transformers' modeling code takes seconds.
if TYPE_CHECKING:
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

__all__ = ["ExpertRouting", "MoTAttention", "MoTDecoderLayer", "Qwen2MoTModel", "Qwen2MoTForCausalLM"]

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ExpertRouting:
    """Positions (along the sequence axis) of the understanding and generation rows.

    ``gen is None`` means every row uses the understanding expert (text and ViT prefill, decoding).
    """

    und: torch.Tensor | None = None
    gen: torch.Tensor | None = None
    # An image block (marker, latent tokens, marker): generation rows are the slice start:stop, the
    # understanding rows the two ends, so rows are sliced, not gathered and scattered.
    gen_block: tuple[int, int] | None = None

    @classmethod
    def understanding(cls) -> "ExpertRouting":
        return cls()

    @classmethod
    def image_block(cls, num_tokens: int, device=None) -> "ExpertRouting":
        """``<|vision_start|>`` on the understanding expert, ``num_tokens`` latent tokens on the generation
        expert, ``<|vision_end|>`` on the understanding expert."""
        return cls(und=torch.tensor([0, num_tokens + 1], device=device),
                   gen=torch.arange(1, num_tokens + 1, device=device), gen_block=(1, num_tokens + 1))

    @classmethod
    def from_gen_mask(cls, gen_mask: torch.Tensor) -> "ExpertRouting":
        if not bool(gen_mask.any()):
            return cls()
        return cls(und=torch.nonzero(~gen_mask).squeeze(1), gen=torch.nonzero(gen_mask).squeeze(1))

    def last(self, count: int, length: int) -> "ExpertRouting":
        """The routing of the last ``count`` of ``length`` rows."""
        if self.gen is None or count == length:
            return self
        if count == 0:  # no rows: nothing to route (and no device sync for the index test below)
            return ExpertRouting()
        start = length - count
        gen = self.gen[self.gen >= start] - start
        return ExpertRouting(und=self.und[self.und >= start] - start, gen=gen) if len(gen) else ExpertRouting()

    def apply(self, x: torch.Tensor, und_fn: Callable, gen_fn: Callable) -> torch.Tensor:
        """Run ``und_fn`` on understanding rows and ``gen_fn`` on generation rows of x (rows = dim 1)."""
        if self.gen is None:
            return und_fn(x)
        if self.gen_block is not None and x.shape[1] == self.gen_block[1] + 1:
            start, stop = self.gen_block
            gen_out = gen_fn(x[:, start:stop])
            und_out = und_fn(torch.cat([x[:, :start], x[:, stop:]], dim=1)).to(gen_out.dtype)
            return torch.cat([und_out[:, :start], gen_out, und_out[:, start:]], dim=1)
        gen, und = self.gen.to(x.device), self.und.to(x.device)  # no-ops unless layers sit on several devices
        gen_out = gen_fn(x[:, gen])
        und_out = und_fn(x[:, und])
        out = gen_out.new_empty(x.shape[:2] + gen_out.shape[2:])
        out[:, gen] = gen_out
        out[:, und] = und_out.to(gen_out.dtype)
        return out


class MoTAttention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

        super().__init__()
        self.rotate = apply_rotary_pos_emb  # bound here: no import statement on the per-token path
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        eps = config.rms_norm_eps
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(hidden, q_dim, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(q_dim, hidden, bias=False))
            setattr(self, "q_norm" + suffix, Qwen2RMSNorm(self.head_dim, eps=eps))
            setattr(self, "k_norm" + suffix, Qwen2RMSNorm(self.head_dim, eps=eps))

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, routing: ExpertRouting,
                attend: AttendFn, outputs: int | None = None) -> torch.Tensor:
        """Attention of every row; with ``outputs`` only the last ``outputs`` rows query (all rows still
        give keys and values), and only their outputs are returned (docs/performance.md#unused-outputs)."""
        batch, length, _ = hidden.shape
        outputs = length if outputs is None else outputs
        queries = routing.last(outputs, length)

        def heads(n):
            return lambda t: t.view(batch, -1, n, self.head_dim)

        q = queries.apply(hidden[:, length - outputs:], self.q_proj, self.q_proj_moe_gen)
        k = routing.apply(hidden, self.k_proj, self.k_proj_moe_gen)
        v = routing.apply(hidden, self.v_proj, self.v_proj_moe_gen)
        q = queries.apply(heads(self.num_heads)(q), self.q_norm, self.q_norm_moe_gen).transpose(1, 2)
        k = routing.apply(heads(self.num_kv_heads)(k), self.k_norm, self.k_norm_moe_gen).transpose(1, 2)
        v = heads(self.num_kv_heads)(v)
        if outputs == length:
            q, k = self.rotate(q, k, cos, sin, unsqueeze_dim=1)
        else:
            q = self.rotate(q, q, cos[:, length - outputs:], sin[:, length - outputs:], unsqueeze_dim=1)[0]
            k = self.rotate(k, k, cos, sin, unsqueeze_dim=1)[0]
        out = attend(self.layer_idx, q, k, v.transpose(1, 2).to(q.dtype))
        out = out.transpose(1, 2).reshape(batch, outputs, self.num_heads * self.head_dim)
        return queries.apply(out, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

        super().__init__()
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, routing: ExpertRouting,
                attend: AttendFn, outputs: int | None = None) -> torch.Tensor:
        """The layer's output of every row, or of the last ``outputs`` rows only."""
        normed = routing.apply(hidden, self.input_layernorm, self.input_layernorm_moe_gen)
        attended = self.self_attn(normed, cos, sin, routing, attend, outputs)
        if outputs is not None:
            length = hidden.shape[1]
            hidden, routing = hidden[:, length - outputs:], routing.last(outputs, length)
        hidden = hidden + attended
        normed = routing.apply(hidden, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return hidden + routing.apply(normed, self.mlp, self.mlp_moe_gen)


class Qwen2MoTModel(nn.Module):
    def __init__(self, config: Qwen2Config):
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding

        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, routing: ExpertRouting,
                attend: AttendFn, outputs: int | None = None) -> torch.Tensor:
        """inputs_embeds (B, L, H), position_ids (B, L) -> final hidden states (B, L, H) after the
        expert-specific final norm; with ``outputs``, those of the last ``outputs`` rows only (B, outputs, H):
        the last layer then computes only what they need (docs/performance.md#unused-outputs)."""
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        hidden = inputs_embeds
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, cos, sin, routing, attend, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, routing, attend, outputs if index == last else None)
        if outputs is not None:
            routing = routing.last(outputs, inputs_embeds.shape[1])
        return routing.apply(hidden, self.norm, self.norm_moe_gen)


class Qwen2MoTForCausalLM(nn.Module):
    """Backbone plus the untied text head; the key layout of ``language_model.*`` in the checkpoint."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def init_moe(self) -> None:
        """Copy every understanding-expert weight into its generation twin (fresh training from a VLM)."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, param in params.items():
                if "_moe_gen" in name:
                    param.copy_(params[name.replace("_moe_gen", "")])
