"""Key/value cache for incremental (token-by-token) decoding.

Self-attention keys and values go into buffers allocated once for the longest output, so a step
writes one position instead of concatenating (and reallocating) the whole history. The buffers are
position-major, (n_layers, max_len, B, H, Dh): the positions written so far are one contiguous block,
with no unwritten slots between one sentence's and head's keys and the next's, and a step's write is one
contiguous (B, H, Dh) slab. On CPU the attention's batched matmuls read such a block faster when it is not
in cache (keys and values of 64 sentences at 24 positions: 209 us against 339 for the batch-major layout
that leaves gaps, one thread). The buffers have
their own dtype: `Transformer.start_cache` keeps them in fp32 on CPU, where batched matmuls of a
single query are several times faster in fp32 than in bf16, except where nmtkit's attention kernel reads them
(`native.cpu_cache_dtype`: bf16, half the bytes). The
cross-attention keys and values depend only on the encoder memory, so they are computed once per
sentence and kept in `memory_kv`.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """static=True keeps every shape of a decoding step fixed, so that the step can be captured once as a CUDA
    graph and replayed (decode.py): the position is a device tensor, a step attends to all `max_len` slots with
    an additive bias that hides the ones not yet written (zeros until then), and `advance` counts on the device.
    """

    def __init__(
        self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, device: torch.device, dtype: torch.dtype,
        static: bool = False,
    ) -> None:
        shape = (n_layers, max_len, batch, n_heads, head_dim)
        self.max_len = max_len
        self.length = 0  # positions already decoded
        self.static = static
        make = torch.zeros if static else torch.empty  # unwritten slots take part in a static step's matmuls
        self.keys = make(shape, device=device, dtype=dtype)  # (n_layers, max_len, B, H, Dh)
        self.values = make(shape, device=device, dtype=dtype)
        self.memory_kv: list[tuple[Tensor, Tensor]] = []  # per layer: (B, H, S, Dh) keys and values
        self.memory_bias: Tensor | None = None  # (B, 1, 1, S): 0 at source tokens, -inf at padding
        if static:
            self.position = torch.zeros(1, dtype=torch.long, device=device)  # the slot this step writes
            self.slots = torch.arange(max_len, device=device)
            self.self_bias: Tensor | None = torch.zeros(1, 1, 1, max_len, device=device, dtype=dtype)
        else:
            self.self_bias = None  # a dynamic step attends to exactly the slots written so far

    def begin_step(self) -> None:
        """Static caches: hide the slots after this step's position (a bias of 0 up to it, -inf after)."""
        if self.static:
            assert self.self_bias is not None
            self.self_bias.zero_().masked_fill_(self.slots > self.position, float("-inf"))

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, 1, Dh) at the current position; return all keys/values so far (B, H, t+1, Dh),
        or with a static cache all `max_len` slots (B, H, max_len, Dh), to be read with `self_bias`."""
        if self.static:
            # in the cache's dtype (fp32 caches on CPU take bf16 steps' keys), as the dynamic path's assignment
            self.keys[layer].index_copy_(0, self.position, k.permute(2, 0, 1, 3).to(self.keys.dtype))
            self.values[layer].index_copy_(0, self.position, v.permute(2, 0, 1, 3).to(self.values.dtype))
            return _by_sentence(self.keys[layer]), _by_sentence(self.values[layer])
        t = self.length
        if t >= self.max_len:
            raise IndexError(f"KV cache is full ({self.max_len} positions)")
        self.keys[layer, t] = k[:, :, 0]
        self.values[layer, t] = v[:, :, 0]
        return _by_sentence(self.keys[layer, : t + 1]), _by_sentence(self.values[layer, : t + 1])

    def advance(self) -> None:
        """Called once per step, after every layer has appended its position."""
        self.length += 1  # a replayed graph does not run this: static caches count on the device
        if self.static:
            self.position += 1

    def reorder(self, index: Tensor, memory: bool = True) -> None:
        """Keep rows `index` (B',) of the batch, e.g. to drop finished sentences or follow beams.

        Only the positions written so far are copied (the buffers hold `max_len`). memory=False leaves the
        cross-attention keys, values and mask as they are: right when every row of `index` has the same source as
        the row it replaces, as when beam search moves rows among one sentence's beams (a copy per step otherwise).
        """
        if self.static:  # a captured graph holds the old tensors
            raise RuntimeError("a static KV cache cannot be reordered; use a dynamic one (static=False) for beam search")
        t = self.length
        shape = (*self.keys.shape[:2], index.numel(), *self.keys.shape[3:])
        keys, values = self.keys.new_empty(shape), self.values.new_empty(shape)
        for layer in range(self.keys.size(0)):  # each layer's written positions are one contiguous block
            torch.index_select(self.keys[layer, :t], 1, index, out=keys[layer, :t])
            torch.index_select(self.values[layer, :t], 1, index, out=values[layer, :t])
        self.keys, self.values = keys, values
        if memory:
            self.memory_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.memory_kv]
            if self.memory_bias is not None:
                self.memory_bias = self.memory_bias.index_select(0, index)


def _by_sentence(block: Tensor) -> Tensor:
    """(L, B, H, Dh) position-major keys or values -> a (B, H, L, Dh) view, as attention reads them."""
    return block.permute(1, 2, 0, 3)
