"""The Transformer encoder-decoder, in plain PyTorch.

Tensor legend used in every shape comment:
    B batch, S source length, T target length, H heads, Dh head dim, D model dim, F FFN dim, V vocab.

Masks follow one convention, built in `padding_mask` below: a bool tensor where True means
"this key may be attended to". On GPUs the decoder's causal mask is SDPA's `is_causal`, so no (T, T)
matrix is ever materialised (on CPU, `attention` builds a small one). Padding on the target side needs no mask of its own: pads come after
the real tokens, so the causal mask already hides them from every real query, and the loss
ignores the pad queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .config import ModelConfig
from .cpu_matmul import Linear, PackedWeight, linear
from .dropout import Dropout, cpu_dropout
from .kv_cache import KVCache
from .tokenizer import PAD_ID


def padding_mask(tokens: Tensor) -> Tensor:
    """(B, S) token ids -> (B, 1, 1, S) bool, True where the key is a real token."""
    return (tokens != PAD_ID)[:, None, None, :]


def unpack_rows(packed: Tensor, rows: Tensor, batch: int, length: int) -> Tensor:
    """(N, C) rows at flat positions `rows` of a (batch, length) grid -> (batch, length, C), zeros elsewhere."""
    full = packed.new_zeros(batch * length, packed.size(-1))
    return full.index_copy_(0, rows, packed).view(batch, length, -1)  # in place: one buffer, autograd-safe (not a leaf)


def sinusoidal_positions(n_positions: int, d_model: int) -> Tensor:
    """(n_positions, D) fixed sine/cosine position encodings."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    B, L, D = x.shape
    return x.view(B, L, n_heads, D // n_heads).transpose(1, 2)  # (B, H, L, Dh)


def _merge_heads(x: Tensor) -> Tensor:
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)  # (B, L, D)


def attend_one(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None = None) -> Tensor:
    """Attention for a single query position: q (B, H, 1, Dh), keys/values (B, H, L, Dh) -> (B, H, 1, Dh).

    Decoding runs this thousands of times on tiny tensors, so it is two batched matmuls and a softmax
    in the keys' dtype (the cache's: fp32 on CPU where these ops attend, since torch's bf16 batched matmuls of this
    shape cost 2-6x more than fp32 ones and copy strided operands), returned in q's dtype. `bias` is an additive
    (B, 1, 1, L) mask: 0 for keys to attend to, -inf for padding. On CPU, nmtkit's own kernel does all of it in one
    call where it is built (native.py; ~10% of a decoding step), over fp32 or bf16 caches (`native.cpu_cache_dtype`).
    """
    if q.device.type == "cpu" and (kernels := native.kernels()) is not None:
        if (out := kernels.attend_one(q, keys, values, bias)) is not None:
            return out
    with torch.autocast(q.device.type, enabled=False):  # autocast would cast fp32 keys back to bf16
        scores = torch.matmul(q.to(keys.dtype) * q.size(-1) ** -0.5, keys.transpose(-1, -2))  # (B, H, 1, L)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)  # (an fp32 mask beside bf16 keys stays in the keys' dtype)
        return torch.matmul(scores.softmax(dim=-1), values).to(q.dtype)


def uses_sdpa(kernel: str, device_type: str) -> bool:
    """Whether training attention with `kernel` (train.attention_kernel) runs SDPA on this device, or two matmuls."""
    return kernel == "sdpa" or (kernel == "auto" and device_type != "cpu")


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False, dropout: float = 0.0, kernel: str = "auto"
) -> Tensor:
    """Scaled dot-product attention: q (B, H, Lq, Dh), k/v (B, H, Lk, Dh) -> (B, H, Lq, Dh).

    `mask` (B, 1, 1, Lk) bool, True where a key may be attended to. `kernel` (train.attention_kernel): with
    `auto`, GPUs use SDPA's fused kernels, and CPUs two matmuls and a softmax in the inputs' own dtype: SDPA's
    CPU kernels either upcast bf16 to fp32 (the math kernel: fp32 matmuls, and fp32 copies of q, k, v kept for
    backward, 20% of a step's saved activations) or have a slow backward at sentence lengths (the flash kernel:
    41 ms vs 9 ms at 14 tokens). `sdpa` and `matmul` choose one path on every device.
    A query whose every key is masked gets NaN on the matmul path (SDPA gives 0); sources always end with EOS, so none is.
    """
    if uses_sdpa(kernel, q.device.type):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-1, -2))  # (B, H, Lq, Lk)
    if is_causal:
        future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu_(1)  # (Lq, Lk)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout > 0.0:
        probs = cpu_dropout(probs, dropout) if probs.device.type == "cpu" else F.dropout(probs, dropout)
    return torch.matmul(probs, v)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, kernel: str = "auto") -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.kernel = kernel  # train.attention_kernel
        self.qkv = Linear(d_model, 3 * d_model)
        self.out = Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = False, rows: Tensor | None = None) -> Tensor:
        """x (B, L, D), or with `rows` packed (N, D): the real positions only, `rows` their indices into B * L
        (the attention itself runs padded, the projections on the N rows)."""
        qkv = self.qkv(x)
        if rows is not None:
            assert mask is not None, "packed rows come with their (B, 1, 1, L) mask"
            qkv = unpack_rows(qkv, rows, mask.size(0), mask.size(-1))  # (B, L, 3D), zeros at padding
        q, k, v = (_split_heads(t, self.n_heads) for t in qkv.chunk(3, dim=-1))  # 3 x (B, H, L, Dh)
        p = self.dropout if self.training else 0.0
        y = _merge_heads(attention(q, k, v, mask, is_causal, dropout=p, kernel=self.kernel))
        if rows is not None:
            y = y.flatten(0, 1).index_select(0, rows)
        return self.out(y)

    def step(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """One decoding position: x (B, 1, D); appends its key/value to the cache."""
        q, k, v = (_split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, 1, Dh)
        keys, values = cache.append(layer, k, v)  # (B, H, t+1, Dh): every earlier position and this one
        return self.out(_merge_heads(attend_one(q, keys, values, cache.self_bias)))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention; keys and values come from the encoder memory."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, kernel: str = "auto") -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.kernel = kernel  # train.attention_kernel
        self.q = Linear(d_model, d_model)
        self.kv = Linear(d_model, 2 * d_model)
        self.out = Linear(d_model, d_model)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S, D) -> keys and values, each (B, H, S, Dh). Computed once per sentence when decoding."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _split_heads(k, self.n_heads), _split_heads(v, self.n_heads)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], src_mask: Tensor) -> Tensor:
        q = _split_heads(self.q(x), self.n_heads)  # (B, H, T, Dh)
        p = self.dropout if self.training else 0.0
        y = attention(q, kv[0], kv[1], src_mask, dropout=p, kernel=self.kernel)
        return self.out(_merge_heads(y))

    def step(self, x: Tensor, kv: tuple[Tensor, Tensor], src_bias: Tensor | None) -> Tensor:
        """One decoding position: x (B, 1, D) attends to the cached memory keys/values."""
        q = _split_heads(self.q(x), self.n_heads)  # (B, H, 1, Dh)
        return self.out(_merge_heads(attend_one(q, kv[0], kv[1], src_bias)))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.up = Linear(d_model, d_ff)
        self.down = Linear(d_ff, d_model)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.drop(self._up_act(x)))

    def up_act_down(self, x: Tensor) -> Tensor:
        """The eval-mode forward without the dropout call, for decoding steps."""
        return self.down(self._up_act(x))

    def _up_act(self, x: Tensor) -> Tensor:
        """act(up(x)); a ReLU is fused into the product where `up`'s weight is packed for inference."""
        return self.up.relu(x) if isinstance(self.act, nn.ReLU) else self.act(self.up(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_kernel: str = "auto") -> None:
        super().__init__()
        self.is_pre_norm = cfg.norm == "pre"
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, attention_kernel)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, src_mask: Tensor, rows: Tensor | None = None) -> Tensor:
        """x (B, S, D), or packed (N, D) with `rows` (see `Transformer.encode`)."""
        if self.is_pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), mask=src_mask, rows=rows))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, mask=src_mask, rows=rows)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_kernel: str = "auto") -> None:
        super().__init__()
        self.is_pre_norm = cfg.norm == "pre"
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, attention_kernel)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, attention_kernel)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.norm3 = nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Full causal pass over x (B, T, D), attending to the encoder's memory (B, S, D)."""
        memory_kv = self.cross_attn.memory_kv(memory)
        if self.is_pre_norm:
            x = x + self.drop(self.self_attn(self.norm1(x), is_causal=True))
            x = x + self.drop(self.cross_attn(self.norm2(x), memory_kv, src_mask))
            return x + self.drop(self.ffn(self.norm3(x)))
        x = self.norm1(x + self.drop(self.self_attn(x, is_causal=True)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory_kv, src_mask)))
        return self.norm3(x + self.drop(self.ffn(x)))

    def step(self, x: Tensor, cache: KVCache, layer: int) -> Tensor:
        """One decoding position, x (B, 1, D), in eval mode (no dropout calls: each op counts here)."""
        memory_kv = cache.memory_kv[layer]
        if self.is_pre_norm:
            x = x + self.self_attn.step(self.norm1(x), cache, layer)
            x = x + self.cross_attn.step(self.norm2(x), memory_kv, cache.memory_bias)
            return x + self.ffn.up_act_down(self.norm3(x))
        x = self.norm1(x + self.self_attn.step(x, cache, layer))
        x = self.norm2(x + self.cross_attn.step(x, memory_kv, cache.memory_bias))
        return self.norm3(x + self.ffn.up_act_down(x))


LayerRunner = Callable[..., Tensor]


def call_layer(layer: nn.Module, *inputs: Tensor) -> Tensor:
    """The plain way to run an encoder or decoder layer: `layer(*inputs)`."""
    return layer(*inputs)


class Transformer(nn.Module):
    """Encoder-decoder Transformer.

    With a joint vocabulary and `tie_embeddings`, the source embedding, target embedding and
    output projection are one matrix; with separate vocabularies only the target embedding and
    the output projection are tied.
    """

    positions: Tensor  # (max_positions, D), a buffer registered in __init__

    def __init__(
        self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, is_joint_vocab: bool, attention_kernel: str = "auto"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.tgt_embed = nn.Embedding(tgt_vocab_size, cfg.d_model, padding_idx=PAD_ID)
        share_src = cfg.tie_embeddings and is_joint_vocab and src_vocab_size == tgt_vocab_size
        self.src_embed = self.tgt_embed if share_src else nn.Embedding(src_vocab_size, cfg.d_model, padding_idx=PAD_ID)
        self.output = None if cfg.tie_embeddings else Linear(cfg.d_model, tgt_vocab_size, bias=False)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.embed_scale = math.sqrt(cfg.d_model)
        self.embed_drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, attention_kernel) for _ in range(cfg.n_enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, attention_kernel) for _ in range(cfg.n_dec_layers))
        # pre-norm stacks end with a LayerNorm; post-norm layers already end normalised
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.output_packed: PackedWeight | None = None  # pack_for_cpu
        self._init_weights()

    def _decoder_layers(self) -> list[DecoderLayer]:
        return cast("list[DecoderLayer]", self.decoder)  # a ModuleList of them, typed for the checker

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # N(0, D^-1/2) so that embeddings scaled by sqrt(D) have unit variance, matching the positions
        for emb in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(emb.weight, std=self.cfg.d_model**-0.5)
            nn.init.zeros_(emb.weight[PAD_ID])

    def _embed(self, table: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        """(B, L) ids -> (B, L, D) scaled embeddings plus positions offset..offset+L-1."""
        L = tokens.size(1)
        if offset + L > self.cfg.max_positions:
            raise ValueError(
                f"sequence of {offset + L} tokens exceeds model.max_positions={self.cfg.max_positions}; "
                "shorten the input or train with a larger model.max_positions"
            )
        x = table(tokens) * self.embed_scale + self.positions[offset : offset + L]
        return self.embed_drop(x)

    def encode(self, src: Tensor, src_mask: Tensor, run_layer: LayerRunner = call_layer) -> Tensor:
        """src (B, S), src_mask (B, 1, 1, S) -> memory (B, S, D), zeros at padding on CPU.

        On CPU the layers run on the real positions only, packed into (N, D) (the padding of a batch's
        sources, ~15% of its positions, costs no projection or FFN work); attention unpacks them. GPUs run
        padded: finding the rows needs the host to read the mask, a sync per step there.
        """
        x = self._embed(self.src_embed, src)
        if src.device.type != "cpu":
            for layer in self.encoder:
                x = run_layer(layer, x, src_mask)
            return self.enc_norm(x)
        B, S = src.shape
        src_mask = src_mask.expand(B, 1, 1, S)  # a mask that broadcasts over the batch gives every sentence its rows
        rows = src_mask.flatten().nonzero().squeeze(1)  # (N,) real positions in B * S
        x = x.flatten(0, 1).index_select(0, rows)
        for layer in self.encoder:
            x = run_layer(layer, x, src_mask, rows)
        return unpack_rows(self.enc_norm(x), rows, B, S)

    def decode(self, memory: Tensor, src_mask: Tensor, tgt_in: Tensor, run_layer: LayerRunner = call_layer) -> Tensor:
        """Teacher-forced decoder pass: tgt_in (B, T) -> hidden states (B, T, D)."""
        x = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            x = run_layer(layer, x, memory, src_mask)
        return self.dec_norm(x)

    @property
    def output_weight(self) -> Tensor:
        """(V, D): the output projection, which is the target embedding when tied."""
        return self.tgt_embed.weight if self.output is None else self.output.weight

    def project(self, hidden: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits over the target vocabulary."""
        if self.output_packed is not None and (logits := self.output_packed.product(hidden)) is not None:
            return logits
        return linear(hidden, self.output_weight)

    def project_into(self, hidden: Tensor, out: Tensor) -> Tensor:
        """A decoding step's (B, D) hidden states -> (B, V) logits in `out`'s dtype: written into `out`, or, with the
        weights packed (`pack_for_cpu`), returned in a tensor of their own (oneDNN writes into no given buffer)."""
        hidden = hidden.to(out.dtype)
        if self.output_packed is not None and (logits := self.output_packed.product(hidden)) is not None:
            return logits
        return torch.mm(hidden, self.output_weight.t(), out=out)

    def pack_for_cpu(self) -> None:
        """Inference on CPU: every projection's weight, and the output projection's, reordered once into oneDNN's
        blocked layout (cpu_matmul.PackedWeight), which the products of a decoding step read ~10% faster. Products
        that autograd records, or that run in a dtype other than the weights', keep the plain weights."""
        for module in self.modules():
            if isinstance(module, Linear) and module is not self.output:  # the output projection is packed below
                module.pack()
        # through `output_weight`, so that it follows a replaced output layer or embedding
        self.output_packed = PackedWeight(self, "output_weight")

    def _apply(self, fn, recurse=True):
        """`.to()`, `.float()`, `.cuda()`, ...: the output projection's packed copy is dropped and made again at the next
        product on CPU (each `Linear` drops its own)."""
        if getattr(self, "output_packed", None) is not None:
            self.output_packed.drop()
        return super()._apply(fn, recurse)

    def hidden_states(self, src: Tensor, tgt_in: Tensor, run_layer: LayerRunner = call_layer) -> Tensor:
        """(B, S), (B, T) -> the decoder's last hidden states (B, T, D): everything before the output projection.
        `run_layer(layer, *inputs)` runs each encoder and decoder layer (the training objective's compiles them)."""
        src_mask = padding_mask(src)
        return self.decode(self.encode(src, src_mask, run_layer), src_mask, tgt_in, run_layer)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """(B, S), (B, T) -> logits (B, T, V)."""
        return self.project(self.hidden_states(src, tgt_in))

    # -- incremental decoding ---------------------------------------------------------------

    def start_cache(self, memory: Tensor, src_mask: Tensor, max_len: int, static: bool = False) -> KVCache:
        """A cache for up to `max_len` decoder positions, with every layer's cross-attention
        keys and values computed from `memory` once, and the source padding as an additive bias.
        static=True: fixed shapes for a CUDA graph (kv_cache.py)."""
        if static and max_len > self.cfg.max_positions:
            raise ValueError(f"{max_len} output positions exceed model.max_positions={self.cfg.max_positions}")
        B = memory.size(0)
        H = self.cfg.n_heads
        # On CPU fp32, or bf16 where nmtkit's attention kernel reads them (native.cpu_cache_dtype); elsewhere the
        # weights' dtype (bf16 after `for_inference`): `memory` itself is fp32 under autocast, whose LayerNorm runs in fp32
        weights = self.output_weight.dtype
        dtype = native.cpu_cache_dtype(weights) if memory.device.type == "cpu" else weights
        cache = KVCache(len(self.decoder), B, H, max_len, self.cfg.d_model // H, memory.device, dtype, static)
        # contiguous copies: every decoding step reads them, and strided ones would be copied each time
        for layer in self._decoder_layers():
            k, v = layer.cross_attn.memory_kv(memory)
            cache.memory_kv.append((k.to(dtype).contiguous(), v.to(dtype).contiguous()))
        # fp32 on CPU (the attention kernel reads an fp32 mask; a bf16 one would be converted at every step)
        zeros = torch.zeros(src_mask.shape, dtype=torch.float32 if memory.device.type == "cpu" else dtype, device=memory.device)
        cache.memory_bias = zeros.masked_fill(~src_mask, float("-inf"))  # (B, 1, 1, S)
        return cache

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """tokens (B, 1): the latest token of each sentence -> hidden state (B, D) at that position.

        Work per call is constant in the prefix length apart from attention over the cached keys.
        """
        if cache.static:  # the position lives on the device, so a captured step replays at every position
            cache.begin_step()
            x = self.tgt_embed(tokens) * self.embed_scale + self.positions.index_select(0, cache.position)
        else:
            x = self._embed(self.tgt_embed, tokens, offset=cache.length)
        for i, layer in enumerate(self._decoder_layers()):
            x = layer.step(x, cache, i)
        cache.advance()
        return self.dec_norm(x[:, 0])
