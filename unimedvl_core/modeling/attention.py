"""Attention kernels and the masks of the packed sequence.

Two ways to attend share one call shape ``attend(layer_idx, q, k, v) -> out`` with q of shape
(B, Hq, Lq, d) and k, v of shape (B, Hkv, Lq, d) for the new tokens:

- ``DenseAttention``: training packs, no cache, an explicit boolean mask (docs/token-layout.md#training-mask).
- ``CachedAttention``: inference; the new keys are written into a preallocated ``KVCache`` and every query
  sees its row's cached keys plus the new keys (all of them, or causally).

PyTorch SDPA is the default kernel; flash-attn is used on CUDA for half-precision caches when installed.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .kv_cache import KVCache

__all__ = ["sdpa", "DenseAttention", "CachedAttention", "DecodeAttention", "packed_attention_mask", "SPLIT_CAUSAL",
           "SPLIT_FULL", "SPLIT_NOISE", "flash_attn_available"]

SPLIT_CAUSAL = "causal"
SPLIT_FULL = "full"
SPLIT_NOISE = "noise"

try:  # optional fast path on CUDA
    from flash_attn import flash_attn_with_kvcache as _flash_attn_with_kvcache
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_with_kvcache = None


def flash_attn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return _flash_attn_with_kvcache is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(d), grouped-query heads; ``mask`` is additive (0 / -inf) or boolean
    (True = may attend)."""
    if mask is not None and mask.device != q.device:
        mask = mask.to(q.device)
    grouped = q.shape[1] != k.shape[1]
    if grouped and mask is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # On CUDA, grouped heads with a mask fall back to the unfused math kernel (the (B, H, Lq, Lk) scores in
        # fp32: minutes and tens of GB for a 1024x1024 image); with the key/value heads repeated, the
        # memory-efficient kernel runs. fp32 and the CPU keep the path the parity checks were measured on.
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = mask.to(q.dtype) if mask.is_floating_point() else mask
        grouped = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


class DenseAttention:
    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask

    def __call__(self, layer_idx: int, q, k, v):
        return sdpa(q, k, v, self.mask)


class CachedAttention:
    """Attend over a KV cache row plus the new tokens; write the new keys into the cache.

    With ``causal=True`` query i sees the cached keys and new keys 0..i (bottom-right aligned, as
    flash-attn does with a cache); otherwise every new key. The cache lengths are not advanced here:
    the caller decides with ``KVCache.advance`` whether the new tokens stay (prefill, decoding) or are
    overwritten next time (denoising queries never enter the cache, see docs/token-layout.md#kv-cache).
    """

    def __init__(self, cache: KVCache, query_len: int, causal: bool, rows: int | None = None):
        self.cache = cache
        self.rows = cache.batch if rows is None else rows
        self.query_len = query_len
        self.causal = causal
        self.use_flash = flash_attn_available(cache.device, cache.dtype)
        # Rows of different lengths (guidance branches) attend run by run, each to its own keys, unmasked,
        # instead of every row to the longest row's keys through a mask.
        self.runs = None if causal or self.use_flash else _equal_length_runs(cache.lengths[:self.rows])
        self.mask = None if self.use_flash or self.runs else cache.query_mask(query_len, causal, self.rows)

    def __call__(self, layer_idx: int, q, k, v):
        """q may hold only the last rows of the block (``Context.run(outputs=...)``); k and v hold all."""
        if self.use_flash and q.shape[2] == k.shape[2]:
            kc, vc = self.cache.layer_buffers(layer_idx, self.rows)
            out = _flash_attn_with_kvcache(
                q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), k=k.transpose(1, 2).contiguous(),
                v=v.transpose(1, 2).contiguous(), cache_seqlens=self.cache.lengths_tensor(self.rows),
                causal=self.causal)
            return out.transpose(1, 2)
        keys, values = self.cache.write(layer_idx, k, v, self.rows)
        if q.shape[2] == 0:  # no row's output is wanted: only the keys and values were needed
            return q
        if self.runs:
            new = k.shape[2]
            return torch.cat([sdpa(q[a:b], keys[a:b, :, :n + new], values[a:b, :, :n + new], None)
                              for a, b, n in self.runs])
        return sdpa(q, keys, values, self._mask_of_last(q.shape[2]))

    def _mask_of_last(self, queries: int) -> torch.Tensor | None:
        if self.use_flash and self.mask is None:  # a shortened query left the flash path (lengths unchanged)
            self.mask = self.cache.query_mask(self.query_len, self.causal, self.rows)
        if self.mask is None or queries == self.query_len:
            return self.mask
        return self.mask[:, :, self.query_len - queries:]


class DecodeAttention:
    """One decoding step of every row at fixed shapes: row b's new key/value is written at slot
    ``lengths[b]`` (a device tensor, so the step holds no Python state and can be replayed as a CUDA graph)
    and its query sees slots ``0..lengths[b]`` of the whole preallocated cache.

    The query heads of one key/value group ride as that group's query rows, so grouped heads need neither a
    copy of the cache per query head nor the unfused kernel (docs/deviations.md#kv-cache).
    """

    def __init__(self, cache: KVCache, lengths: torch.Tensor):
        self.cache = cache
        self.lengths = lengths
        self.mask = None

    def prepare(self) -> None:
        """The (rows, 1, 1, capacity) visibility mask of this step, from the current ``lengths``."""
        slots = torch.arange(self.cache.capacity, device=self.lengths.device)
        visible = (slots[None, :] <= self.lengths[:, None])[:, None, None, :]
        self.mask = additive_mask(visible, self.cache.dtype)  # faster than a boolean mask on the CPU

    def __call__(self, layer_idx: int, q, k, v):
        kbuf, vbuf = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        rows, kv_heads, _, head_dim = k.shape
        index = self.lengths.view(rows, 1, 1, 1).expand(rows, kv_heads, 1, head_dim)
        kbuf[:rows].scatter_(2, index, k)
        vbuf[:rows].scatter_(2, index, v)
        groups = q.shape[1] // kv_heads
        grouped_q = q.reshape(rows, kv_heads, groups, head_dim)  # query head h belongs to group h // groups
        out = F.scaled_dot_product_attention(grouped_q, kbuf[:rows], vbuf[:rows], attn_mask=self.mask)
        return out.reshape(rows, kv_heads * groups, 1, head_dim)


def _equal_length_runs(lengths: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """Maximal runs ``(start, end, length)`` of consecutive rows with equal cached lengths; None when every
    row has the same length (one unmasked attention covers them all)."""
    runs: list[tuple[int, int, int]] = []
    for row, length in enumerate(lengths):
        if runs and runs[-1][2] == length:
            runs[-1] = (runs[-1][0], row + 1, length)
        else:
            runs.append((row, row + 1, length))
    return runs if len(runs) > 1 else None


def packed_attention_mask(split_lens: Sequence[int], split_modes: Sequence[str], device=None) -> torch.Tensor:
    """Boolean (L, L) mask of one packed sample (docs/token-layout.md#training-mask); True = the query (row) may
    see the key (column).

    - a query sees every earlier token of the sample; inside its own split it sees earlier-or-equal tokens
      (``causal``) or all tokens (``full`` and ``noise``);
    - tokens of a ``noise`` split are invisible to every query outside that split.
    """
    if len(split_lens) != len(split_modes):
        raise ValueError("split_lens and split_modes differ in length")
    total = int(sum(split_lens))
    mask = torch.tril(torch.ones(total, total, dtype=torch.bool, device=device))
    start = 0
    for length, mode in zip(split_lens, split_modes):
        end = start + int(length)
        if mode in (SPLIT_FULL, SPLIT_NOISE):
            mask[start:end, start:end] = True
        elif mode != SPLIT_CAUSAL:
            raise ValueError(f"unknown split mode {mode!r}")
        if mode == SPLIT_NOISE:
            mask[:start, start:end] = False
            mask[end:, start:end] = False
        start = end
    return mask


def block_diagonal(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Samples of a pack never see each other."""
    return torch.block_diag(*masks).bool() if len(masks) > 1 else masks[0]
