"""Preallocated key/value cache.

One K and one V buffer per layer, shaped (batch, kv_heads, capacity, head_dim), allocated once and filled
in place: appending a token costs a copy of that token only (the reference re-allocates the whole cache on
every update, see docs/deviations.md#kv-cache). Rows may hold contexts of different lengths; this is how the
conditional and the two
unconditional guidance branches run as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["KVCache"]


class KVCache:
    def __init__(self, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, devices: Sequence[torch.device] | torch.device):
        if isinstance(devices, (torch.device, str)):
            devices = [torch.device(devices)] * num_layers
        self.devices = [torch.device(d) for d in devices]
        self.batch = batch
        self.capacity = capacity
        self.dtype = dtype
        shape = (batch, kv_heads, capacity, head_dim)
        # Zeros, not empty: masked-out slots still enter the attention product, and stale NaN/inf bits
        # there would poison it (NaN * 0 = NaN).
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in self.devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in self.devices]
        self.lengths = [0] * batch

    @property
    def device(self) -> torch.device:
        return self.devices[0]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def lengths_tensor(self, rows: int | None = None) -> torch.Tensor:
        rows = self.batch if rows is None else rows
        return torch.tensor(self.lengths[:rows], dtype=torch.int32, device=self.device)

    def layer_buffers(self, layer_idx: int, rows: int):
        return self.keys[layer_idx][:rows], self.values[layer_idx][:rows]

    def _check_room(self, query_len: int, rows: int) -> None:
        need = max(self.lengths[:rows]) + query_len
        if need > self.capacity:
            raise RuntimeError(f"KV cache overflow: {need} tokens needed, {self.capacity} allocated")

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, rows: int):
        """Write new keys/values of shape (rows, kv_heads, q, d) after each row's cached tokens; return the
        key/value views covering every row's cache plus the new tokens."""
        q = k.shape[2]
        self._check_room(q, rows)
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        lens = self.lengths[:rows]
        if all(n == lens[0] for n in lens):
            kbuf[:rows, :, lens[0]:lens[0] + q] = k
            vbuf[:rows, :, lens[0]:lens[0] + q] = v
        else:  # one scatter for all rows, each at its own length
            slots = torch.tensor(lens, device=k.device)[:, None] + torch.arange(q, device=k.device)[None, :]
            index = slots[:, None, :, None].expand(rows, k.shape[1], q, k.shape[3])
            kbuf[:rows].scatter_(2, index, k)
            vbuf[:rows].scatter_(2, index, v)
        end = max(lens) + q
        return kbuf[:rows, :, :end], vbuf[:rows, :, :end]

    def query_mask(self, query_len: int, causal: bool, rows: int | None = None) -> torch.Tensor | None:
        """Additive (rows, 1, q, max_len + q) mask, 0 where row b's query i sees key j, i.e. j < len_b +
        (i + 1 if causal else q), -inf elsewhere. None when nothing is masked. (SDPA on CPU runs faster
        with an additive mask than with a boolean one.)"""
        rows = self.batch if rows is None else rows
        lens = self.lengths[:rows]
        if all(n == lens[0] for n in lens) and (not causal or query_len == 1):
            return None
        self._check_room(query_len, rows)
        total = max(lens) + query_len
        key = torch.arange(total, device=self.device)
        visible = torch.tensor(lens, device=self.device)[:, None]  # (rows, 1)
        if causal:
            limit = visible + torch.arange(1, query_len + 1, device=self.device)[None, :]  # (rows, q)
        else:
            limit = (visible + query_len).expand(rows, query_len)
        visible = (key[None, None, :] < limit[:, :, None])[:, None]
        return torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))

    def advance(self, query_len: int, rows: int | None = None) -> None:
        """Keep the tokens just written: they become part of the cached context."""
        rows = self.batch if rows is None else rows
        for b in range(rows):
            self.lengths[b] += query_len

    @classmethod
    def stack(cls, sources: Sequence[tuple["KVCache", int, int]], extra_capacity: int) -> "KVCache":
        """A new cache whose row i is the first ``length_i`` tokens of row ``row_i`` of cache ``source_i``,
        with room for ``extra_capacity`` more tokens per row (the query block of a denoising step)."""
        first = sources[0][0]
        capacity = max(length for _, _, length in sources) + extra_capacity
        _, kv_heads, _, head_dim = first.keys[0].shape
        out = cls(first.num_layers, len(sources), capacity, kv_heads, head_dim, first.dtype, first.devices)
        out.fill(sources)
        return out

    def fill(self, sources: Sequence[tuple["KVCache", int, int]]) -> None:
        """Row i becomes the first ``length_i`` tokens of row ``row_i`` of cache ``source_i``; what lies
        beyond is left as it is (masked by the lengths)."""
        if len(sources) > self.batch or max(length for _, _, length in sources) > self.capacity:
            raise RuntimeError(f"{len(sources)} rows do not fit a cache of {self.batch} x {self.capacity}")
        for i, (src, row, length) in enumerate(sources):
            for layer in range(self.num_layers):
                self.keys[layer][i, :, :length] = src.keys[layer][row, :, :length]
                self.values[layer][i, :, :length] = src.values[layer][row, :, :length]
            self.lengths[i] = length
