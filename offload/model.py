"""A Llama-family decoder (llama, mistral, qwen2, qwen3, phi3, smollm3) in plain torch.

One sequence at a time: hidden states are `[S, dim]`, no batch axis, because the
runtime serves one user's long context. The model does not own its KV cache:
`forward` is handed a cache whose per-layer objects each attention layer calls
(`append` the new keys and values, then `attend` with the queries), so the same
model runs over an in-memory cache or the tiered store.

Q/K weights are in HF's layout (rotate-half RoPE); the GGUF loader un-permutes
llama.cpp's interleaved rows before they reach this module.

A layer's elementwise work (its norms and residual sums, RoPE, SwiGLU) goes
through `ops` (offload/kernels/layer.py): torch's operations, or on CUDA
one Triton kernel each (`Transformer.use_ops`, which `Runtime` calls with its backend's).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from offload.kernels.layer import REFERENCE
from offload.kvcache import KVCache
from offload.model_args import ModelArgs

ROPE_BLOCK = 4096  # positions of the RoPE table computed at a time


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse RoPE frequencies `[head_dim/2]` (float32, CPU), scaled as the model's
    `rope_scaling` says (llama3, yarn, linear) or by llama.cpp's stored factors. With
    RoPE over part of each head, the pairs past `rope_dim/2` have frequency 0: they are
    not rotated (see `weights.pair_rotary_dims`)."""
    inv_freq = _scaled_inv_freq(args)
    return torch.cat((inv_freq, inv_freq.new_zeros(args.head_dim // 2 - inv_freq.numel())))


def rope_scale(args: ModelArgs) -> torch.Tensor:
    """What cos and sin are multiplied by `[head_dim]`: the scaling's attention factor
    (yarn, longrope) on the rotated dimensions, 1 on the others."""
    scale = args.rope_scaling.cos_sin_scale if args.rope_scaling else 1.0
    half = torch.ones(args.head_dim // 2, dtype=torch.float32, device="cpu")
    half[: args.rope_dim // 2] = scale
    return torch.cat((half, half))


def _scaled_inv_freq(args: ModelArgs) -> torch.Tensor:
    D = args.rope_dim
    inv_freq = 1.0 / (
        args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D)
    )
    if args.rope_freq_factors is not None:
        return inv_freq / torch.tensor(args.rope_freq_factors, dtype=torch.float32, device="cpu")
    s = args.rope_scaling
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind == "yarn":
        return _yarn_inv_freq(inv_freq, s, args.rope_theta, D)
    if s.kind == "longrope":  # the long factors for a window past the original (llama.cpp's
        # choice; transformers switches per forward, so its short prompts use the short ones)
        long = args.max_seq_len > s.original_max_position
        factors = s.long_factor if long else s.short_factor
        return inv_freq / torch.tensor(factors, dtype=torch.float32, device="cpu")
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band
    # between interpolated smoothly.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, s, base: float, D: int) -> torch.Tensor:
    """YaRN (Peng et al. 2023): a dimension pair that turns more than `beta_fast` times
    over the original context keeps its frequency, one that turns fewer than `beta_slow`
    times is divided by `factor`, and a linear ramp mixes the two between (its ends
    rounded out to whole pairs, as HF and llama.cpp do)."""

    def pair(rotations: float) -> float:  # the pair that turns `rotations` times
        return (
            D * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low = max(math.floor(pair(s.beta_fast)), 0)
    high = min(math.ceil(pair(s.beta_slow)), D - 1)
    if low == high:
        high += 0.001
    pairs = torch.arange(D // 2, dtype=torch.float32, device="cpu")
    ramp = ((pairs - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # the share of the original frequency
    return inv_freq / s.factor * (1 - kept) + inv_freq * kept


class RMSNorm(nn.Module):
    ops = REFERENCE  # (see the module's docstring)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual sum x + y, and it normed."""
        return self.ops.add_rms_norm(x, y, self.weight, self.eps)


class Attention(nn.Module):
    ops = REFERENCE

    def __init__(self, args: ModelArgs, fused: bool = False, rotates: bool = True):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        self.rotates = rotates  # False: a layer without RoPE (`ModelArgs.nope_layers`)
        bias = args.qkv_bias
        # qwen3: each q and k head RMS-normed over its head_dim before RoPE
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        if fused:  # the layout `fuse` makes, for weights saved after it (weight_cache.py)
            qkv = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
            self.wqkv = nn.Linear(args.dim, qkv, bias=bias)
            self.wo = nn.Linear(args.num_heads * args.head_dim, args.dim, bias=False)
            return
        self.wq = nn.Linear(args.dim, args.num_heads * args.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=bias)
        self.wo = nn.Linear(args.num_heads * args.head_dim, args.dim, bias=False)

    def fuse(self) -> None:
        """Replace wq, wk, wv by one matmul `wqkv` (after loading: checkpoints name them
        apart). A decode step is bound by per-call cost and weight reads, so one call
        instead of three, and one RoPE over q and k together, is measurably faster."""
        self.wqkv = _concat_linears([self.wq, self.wk, self.wv])
        del self.wq, self.wk, self.wv

    def _projected(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v heads [Hq + 2 Hkv, S, D] of the normed input x [S, dim] (a view)."""
        Hq, Hkv = self.num_heads, self.num_kv_heads
        qkv = self.wqkv(x).view(x.shape[0], Hq + 2 * Hkv, self.head_dim)
        if self.q_norm is not None:
            q, k, v = qkv.split((Hq, Hkv, Hkv), dim=1)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=1)
        return qkv.transpose(0, 1)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated q [Hq, S, D], rotated k and v [Hkv, S, D] of the normed input x [S, dim]."""
        Hq, Hkv = self.num_heads, self.num_kv_heads
        qkv = self._projected(x)
        qk = self.ops.rope(qkv[: Hq + Hkv], cos, sin) if self.rotates else qkv[: Hq + Hkv]
        return qk[:Hq], qk[Hq:], qkv[Hq + Hkv :]

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated queries [Hq, S, D] of the normed input x [S, dim] (speculation)."""
        return self._qkv(x, cos, sin)[0]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_layer):
        S = x.shape[0]
        rope_store = getattr(cache_layer, "rope_store", None)
        if rope_store is not None:  # a fixed-shape step's layer: RoPE and the K/V store in one
            if not self.rotates:  # (cos 1, sin 0: the same kernel stores the keys unrotated)
                cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
            q = rope_store(self._projected(x), cos, sin)
        else:
            q, k, v = self._qkv(x, cos, sin)
            cache_layer.append(k, v)
        out = cache_layer.attend(q)  # [Hq, S, D]
        return self.wo(out.transpose(0, 1).reshape(S, self.num_heads * self.head_dim))


def _concat_linears(linears: list[nn.Linear]) -> nn.Module:
    if not isinstance(linears[0], nn.Linear):  # int4 linears packed as they were read
        return type(linears[0]).concat(linears)
    w = linears[0].weight
    fused = nn.Linear(w.shape[1], sum(lin.out_features for lin in linears),
                      bias=linears[0].bias is not None, device="meta")  # fmt: skip
    fused.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


class FeedForward(nn.Module):
    ops = REFERENCE

    def __init__(self, args: ModelArgs, fused: bool = False):
        super().__init__()
        if fused:
            self.w13 = nn.Linear(args.dim, 2 * args.hidden_dim, bias=False)
            self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
            return
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def fuse(self) -> None:
        """Gate and up projections as one matmul `w13` (see `Attention.fuse`)."""
        self.w13 = _concat_linears([self.w1, self.w3])
        del self.w1, self.w3

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of x, plus `residual` where given (summed in the last matmul on CUDA)."""
        act = self.ops.silu_mul(self.w13(x))  # silu(gate) * up
        return self.w2(act) if residual is None else self.ops.linear_add(act, self.w2, residual)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, fused: bool = False, layer: int = 0):
        super().__init__()
        self.attention = Attention(args, fused, rotates=layer not in args.nope_layers)
        self.feed_forward = FeedForward(args, fused)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache_layer):
        a = self.attention(self.attention_norm(x), cos, sin, cache_layer)
        h, normed = self.ffn_norm.add(x, a)  # h = x + a
        return self.feed_forward(normed, residual=h)  # h + mlp(normed)


class Transformer(nn.Module):
    """Build on the meta device, then `load_state_dict(..., assign=True)`; `fused`
    builds the layout `fuse()` makes (for a state dict saved after it)."""

    def __init__(self, args: ModelArgs, fused: bool = False):
        super().__init__()
        self.args = args
        # An explicit (uninitialized) weight: Embedding's own init on the meta device
        # imports torch's Python reference kernels, 1.5 s of a start.
        self.tok_embeddings = nn.Embedding(
            args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim)
        )
        self.layers = nn.ModuleList(Block(args, fused, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Plain attributes, not buffers: derived from args, never loaded.
        self._inv_freq = rope_inv_freq(args)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_args(self, args: ModelArgs) -> None:
        """New args of the same shape (another RoPE scaling: `model.rope_scaling`)."""
        assert args.head_dim == self.args.head_dim, (args, self.args)
        self.args, self._inv_freq, self._rope_cache = args, rope_inv_freq(args), None

    def tie_weights(self) -> None:
        self.output.weight = self.tok_embeddings.weight

    def use_ops(self, ops) -> Transformer:
        """Run the layers' elementwise work with `ops` (offload/kernels/layer.py: the
        Triton kernels on CUDA, `Backend.layer_ops`)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, FeedForward)):
                m.ops = ops
        return self

    def fuse(self) -> Transformer:
        """Fuse each block's projections (call once, after the weights are loaded)."""
        for block in self.layers:
            block.attention.fuse()
            block.feed_forward.fuse()
        return self

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def rope_table(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[N, D]` (N >= num_positions) of positions 0.. in the model dtype.

        Built in blocks of ROPE_BLOCK positions, each computed alone, so a position's
        values never depend on how far the table has grown (greedy decoding stays
        exactly repeatable), and kept: a decode step reads its rows by index."""
        table = self._rope_cache
        if table is None or table[0].device != self.device:
            table = self._rope_cache = (torch.empty(0, self.args.head_dim, dtype=self.dtype,
                                                    device=self.device),) * 2  # fmt: skip
        have = table[0].shape[0]
        if have >= num_positions:
            return table
        if self._inv_freq.device != self.device:
            self._inv_freq = self._inv_freq.to(self.device)
        cos, sin = [table[0]], [table[1]]
        scale = rope_scale(self.args).to(self.device)
        for start in range(have, num_positions, ROPE_BLOCK):
            pos = torch.arange(start, start + ROPE_BLOCK, device=self.device, dtype=torch.float32)
            freqs = torch.outer(pos, self._inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos.append((emb.cos() * scale).to(self.dtype))
            sin.append((emb.sin() * scale).to(self.dtype))
        self._rope_cache = (torch.cat(cos), torch.cat(sin))
        return self._rope_cache

    def rope(self, start: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[S, D]` for positions start..start+S-1, in the model dtype (views)."""
        cos, sin = self.rope_table(start + S)
        return cos[start : start + S], sin[start : start + S]

    # no_grad, not inference_mode: the cache's tensors outlive the forward and are
    # updated in place outside it (truncation, loading), which inference tensors forbid.
    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        """tokens: [S] int64, positions follow the cache's current length.

        Returns float32 logits `[S, vocab]`, or `[1, vocab]` with `last_only`
        (prefill chunks need only the last row, and the vocabulary is large).
        """
        S = tokens.shape[0]
        cos, sin = self.rope(cache.num_tokens, S)
        x = self.tok_embeddings(tokens)  # [S, dim]
        for i, (block, cache_layer) in enumerate(zip(self.layers, cache.layers, strict=True)):
            cache.layer_start(i, x, cos, sin)  # a prefetching cache looks one layer ahead
            x = block(x, cos, sin, cache_layer)
        cache.advance(S)
        if last_only:
            x = x[-1:]
        return self.output(self.norm(x)).float()

    @torch.no_grad()
    def forward_at(
        self, tokens: torch.Tensor, positions: torch.Tensor, layers, run_block=None
    ) -> torch.Tensor:
        """The fixed-shape forward of a decode step: tokens and positions `[S]` are device
        tensors and `layers` are cache layers that read them there, so nothing here waits
        on the host and a CUDA graph can capture it. The RoPE table must already cover
        the positions (`rope_table`). Returns float32 logits `[S, vocab]`. `run_block(block,
        x, cos, sin, cache_layer)` runs each block where given (a compiled one)."""
        cos_table, sin_table = self._rope_cache
        cos, sin = cos_table.index_select(0, positions), sin_table.index_select(0, positions)
        x = self.tok_embeddings(tokens)
        for block, cache_layer in zip(self.layers, layers, strict=True):
            x = (
                block(x, cos, sin, cache_layer)
                if run_block is None
                else run_block(block, x, cos, sin, cache_layer)
            )
        return self.output(self.norm(x)).float()
