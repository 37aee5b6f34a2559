"""Key/value cache for incremental (token-by-token) decoding.

Self-attention keys and values go into buffers allocated once for the longest output, so a step
writes one position instead of concatenating (and reallocating) the whole history. The buffers have
their own dtype: `Transformer.start_cache` keeps them in fp32 on CPU, where batched matmuls of a
single query are several times faster in fp32 than in bf16. The
cross-attention keys and values depend only on the encoder memory, so they are computed once per
sentence and kept in `memory_kv`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.max_len = max_len
        self.length = 0  # positions already decoded
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (n_layers, B, H, max_len, Dh)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.memory_kv: list[tuple[Tensor, Tensor]] = []  # per layer: (B, H, S, Dh) keys and values
        self.memory_bias: Tensor | None = None  # (B, 1, 1, S): 0 at source tokens, -inf at padding

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, 1, Dh) at the current position; return all keys/values so far (B, H, t+1, Dh)."""
        t = self.length
        if t >= self.max_len:
            raise IndexError(f"KV cache is full ({self.max_len} positions)")
        self.keys[layer, :, :, t : t + 1] = k
        self.values[layer, :, :, t : t + 1] = v
        return self.keys[layer, :, :, : t + 1], self.values[layer, :, :, : t + 1]

    def advance(self) -> None:
        """Called once per step, after every layer has appended its position."""
        self.length += 1

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (B',) of the batch, e.g. to drop finished sentences or follow beams."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)
        self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]
        if self.memory_bias is not None:
            self.memory_bias = self.memory_bias.index_select(0, index)
