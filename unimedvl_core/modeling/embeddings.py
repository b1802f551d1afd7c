"""Small embedding modules: 2-D sin-cos position tables, the flow-time embedder, the ViT connector."""

from __future__ import annotations

import torch
from torch import nn

# diffusers' timestep features and transformers' activations are imported where they are used, not with
# this module: importing either library takes seconds.

__all__ = ["PositionEmbedding", "TimestepEmbedder", "MLPConnector", "sincos_2d_table", "grid_position_ids"]


def sincos_2d_table(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table of shape (grid_size**2, dim), row id = r * grid_size + c
    (docs/architecture.md#building-blocks).

    The first half of the channels encodes the column, the second half the row; each half is
    concat(sin(p * w_k), cos(p * w_k)) with w_k = 10000 ** (-k / (dim / 4)). Computed in float64.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width must be a multiple of 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32).to(torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        args = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([encode(cols), encode(rows)], dim=1).to(torch.float32)


def grid_position_ids(h: int, w: int, max_per_side: int, device=None) -> torch.Tensor:
    """Flattened position ids of an h x w patch grid in extrapolate mode: r * max_per_side + c
    (docs/architecture.md#grid-positions)."""
    if h > max_per_side or w > max_per_side:
        raise ValueError(f"a {h}x{w} patch grid exceeds the position table ({max_per_side} per side)")
    r = torch.arange(h, device=device)[:, None]
    c = torch.arange(w, device=device)[None, :]
    return (r * max_per_side + c).reshape(-1)


class PositionEmbedding(nn.Module):
    """Frozen 2-D sin-cos table indexed by flattened grid ids; stored in the checkpoint as ``pos_embed``."""

    def __init__(self, max_per_side: int, dim: int):
        super().__init__()
        self.max_per_side = max_per_side
        self.pos_embed = nn.Parameter(torch.zeros(max_per_side**2, dim), requires_grad=False)

    def reset_table(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.max_per_side, self.pos_embed.shape[1]))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> hidden vector: cos-first sinusoidal features (256) then an MLP
    (docs/architecture.md#building-blocks)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        freq = get_timestep_embedding(t.reshape(-1).float(), self.frequency_size, flip_sin_to_cos=True,
                                      downscale_freq_shift=0)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class MLPConnector(nn.Module):
    """ViT features -> LLM width: fc2(act(fc1(x)))."""

    def __init__(self, in_dim: int, out_dim: int, act: str):
        from transformers.activations import ACT2FN

        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.activation = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))
