"""Loading a single GGUF file: metadata -> ModelArgs, tensors dequantized with `gguf`.

llama.cpp's converter permutes the Q and K rows of llama-architecture models (and
SmolLM3's) so that its RoPE can rotate adjacent pairs (interleaved). This model uses
HF's rotate-half RoPE, so those rows are permuted back here; qwen2 files are stored
unpermuted.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offload.errors import ConfigError, ModelLoadError
from offload.model import Transformer
from offload.model_args import (
    NOPE_INTERVAL,
    SUPPORTED_ARCHS,
    ModelArgs,
    RopeScaling,
    whole_number,
)
from offload.weights import build_model, rename, split_fused

_GGUF_NAMES = [
    (r"token_embd\.weight", "tok_embeddings.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"layers.\1.attention.wq.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"layers.\1.attention.wk.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"layers.\1.attention.wv.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"layers.\1.attention.wo.weight"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", r"layers.\1.attention.\2_norm.weight"),
    (r"blk\.(\d+)\.attn_qkv\.weight", r"layers.\1.attention.wqkv.weight"),  # phi3
    (r"blk\.(\d+)\.ffn_gate\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.attention_norm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.ffn_norm.weight"),
]
_GGUF_PATTERNS = [(re.compile(p + "$"), r) for p, r in _GGUF_NAMES]
_BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down))\.weight$")


def open_gguf(path: Path):
    """A `gguf.GGUFReader` (memory-mapped), or a ModelLoadError naming the file."""
    import gguf  # imported here: the module is only needed for GGUF sources

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ...
        raise ModelLoadError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e})"
        ) from None


def field_value(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_args(reader, path: Path) -> ModelArgs:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    try:
        return _gguf_args(reader, arch, path)
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:  # a string for a number, and such
        raise ModelLoadError(f"{path}: invalid GGUF metadata value: {e}") from None


def _gguf_args(reader, arch: str, path: Path) -> ModelArgs:
    def req(key: str, default=None):
        value = field_value(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        return value

    def count(key: str, default=None) -> int:
        return whole_number(req(key, default), f"{arch}.{key}")

    tensors = {t.name for t in reader.tensors}
    dim = count("embedding_length")
    num_heads = count("attention.head_count")
    tokens = field_value(reader, "tokenizer.ggml.tokens") or []
    factors = _vector(reader, "rope_freqs.weight")
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    context = count("context_length")
    layers = count("block_count")
    # SmolLM3's layers without RoPE: its files do not say; llama.cpp takes every 4th
    nope = range(NOPE_INTERVAL - 1, layers, NOPE_INTERVAL) if arch == "smollm3" else ()
    num_kv_heads = count("attention.head_count_kv", num_heads)
    head_dim, rotary_dim = _head_dims(reader, arch, dim, num_heads, num_kv_heads)
    scaling = gguf_rope_scaling(reader, arch, context)
    if scaling is not None:
        context = max(context, scaling.context)
    # Phi-3's sliding window (mini-4k: 2,047) caps the context, as from config.json:
    # attention here is global, exact up to the window only. (Other converters write
    # windows their models do not use, as Qwen2.5's config.json holds one turned off.)
    window = count("attention.sliding_window", 0) if arch == "phi3" else 0
    if window and window < context:
        context = window
    return ModelArgs(
        arch=arch,
        dim=dim,
        num_layers=layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        nope_layers=nope,
        hidden_dim=count("feed_forward_length"),
        vocab_size=count("vocab_size", len(tokens)) or len(tokens),
        norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        rope_theta=float(req("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_freq_factors=factors,
        max_seq_len=context,
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_ids=() if eos is None else (whole_number(eos, "tokenizer.ggml.eos_token_id"),),
    )


def _head_dims(reader, arch: str, dim: int, heads: int, kv_heads: int) -> tuple[int, int | None]:
    """(head_dim, rotary_dim): a head's size from `attention.key_length`, else from the
    rows of the q matrix (or of the fused qkv), else RoPE's or dim / heads; and RoPE's
    dimensions (`rope.dimension_count`) where they are not the whole head (Phi-4-mini's
    files give 96 for heads of 128, and no key_length)."""

    def count(key: str) -> int | None:
        value = field_value(reader, f"{arch}.{key}", None)
        return None if value is None else whole_number(value, f"{arch}.{key}")

    rot, head = count("rope.dimension_count"), count("attention.key_length")
    if head is None:
        out_rows = {t.name: int(t.shape[-1]) for t in reader.tensors}  # (shapes reversed)
        q, qkv = out_rows.get("blk.0.attn_q.weight"), out_rows.get("blk.0.attn_qkv.weight")
        rows, per = (q, heads) if q else (qkv, heads + 2 * kv_heads)
        if rows and per > 0 and rows % per == 0:
            head = rows // per
    head = head or rot or (dim // heads if heads > 0 else 0)  # 0 heads: refused later
    return head, (rot if rot is not None and rot != head else None)


PERMUTED = ("llama", "smollm3")  # archs whose Q/K rows llama.cpp's converter permutes
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _vector(reader, name: str) -> tuple[float, ...] | None:
    """A small float tensor of the file (RoPE factors) as a tuple; None where absent."""
    t = next((t for t in reader.tensors if t.name == name), None)
    return None if t is None else tuple(float(x) for x in np.asarray(t.data, np.float32).ravel())


def gguf_rope_scaling(reader, arch: str, context: int) -> RopeScaling | None:
    """`{arch}.rope.scaling.*` as a RopeScaling (none, linear or yarn), or Phi-3's
    LongRoPE factors (`rope_factors_long/short.weight`); llama.cpp keeps Llama 3.1's
    scaling as per-frequency factors, `rope_freqs.weight`, instead."""

    def key(name: str, default=None):
        return field_value(reader, f"{arch}.rope.scaling.{name}", default)

    long = _vector(reader, "rope_factors_long.weight")
    kind = "longrope" if long is not None else key("type", "none")
    if kind == "none":
        return None
    if kind not in ("linear", "yarn", "longrope"):
        raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: none, linear, yarn)")
    try:
        if kind == "longrope":
            original = int(key("original_context_length", context))
            attention = key("attn_factor")
            return RopeScaling(factor=context / max(1, original), kind=kind,
                               original_max_position=original, long_factor=long,
                               short_factor=_vector(reader, "rope_factors_short.weight") or long,
                               attention_factor=None if attention is None else float(attention))  # fmt: skip
        factor = float(key("factor"))
        original = int(key("original_context_length", context))
        if kind == "linear":  # (context_length is the stretched one where no original is given)
            if key("original_context_length") is None:
                original = max(1, int(context / factor))
            return RopeScaling(factor=factor, kind=kind, original_max_position=original)
        # llama.cpp multiplies YaRN's 0.1 ln(factor) + 1 by the file's attn_factor (default 1)
        attention = float(key("attn_factor", 1.0)) * (
            0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        )
        return RopeScaling(factor=factor, kind=kind, original_max_position=original,
                           beta_fast=float(key("yarn_beta_fast", 32.0)),
                           beta_slow=float(key("yarn_beta_slow", 1.0)),
                           attention_factor=attention)  # fmt: skip
    except (TypeError, ValueError) as e:  # a missing factor, a string for a number
        raise ConfigError(f"invalid GGUF metadata {arch}.rope.scaling.*: {e}") from None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (d0 d1)(d2 d3).. -> (d0 d2 ..)(d1 d3 ..)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weight_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape as torch's (GGUF lists the fastest dimension first)."""
    return tuple(int(d) for d in reversed(t.shape))


def int4_rows_of(t) -> np.ndarray | None:
    """The int4 form's rows [n, k / 32, 20] (offload/quantize.py `int4_rows`: each
    group's codes two to a byte, its float16 scale and minimum) of a Q4_0, Q4_1 or Q4_K
    tensor, from its blocks: its own codes (Q4_K's scales and minimums are float16
    products of its 6-bit multiples, as llama.cpp computes them in float32); None
    for other types."""
    import gguf

    kind = t.tensor_type.name
    if kind not in ("Q4_0", "Q4_1", "Q4_K"):
        return None
    n = int(t.shape[-1])
    raw = np.asarray(t.data, dtype=np.uint8).reshape(n, -1)
    if kind == "Q4_K":  # per 256: d, dmin, 12 bytes of 6-bit multiples, 128 of codes
        blocks = raw.reshape(n, -1, 144)
        d, dmin = (
            blocks[..., i : i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2)
        )
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
        scale = (d * sc.reshape(n, -1, 8)).astype(np.float16)  # [n, blocks, 8 groups]
        low = -(dmin * m.reshape(n, -1, 8)).astype(np.float16)
        qs = blocks[..., 16:].reshape(n, -1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
        q = (qs & 15).reshape(n, -1, 32)  # group g of a block: run g // 2, its half g % 2
        nibbles = q[..., :16] | (q[..., 16:] << 4)  # (byte j: codes j and j + 16)
        parts = [nibbles, *(x.reshape(n, -1, 1).view(np.uint8) for x in (scale, low))]
        return np.concatenate([p.reshape(n, -1, p.shape[-1]) for p in parts], axis=-1)
    size = 20 if kind == "Q4_1" else 18  # d, (m,) then the codes as the int4 form holds them
    blocks = raw.reshape(n, -1, size)
    d = blocks[..., :2]
    if kind == "Q4_1":
        low = blocks[..., 2:4]
    else:  # Q4_0: w = d (q - 8), a minimum of -8 d (exact in float16)
        low = (-8 * d.copy().view(np.float16)).view(np.uint8)
    return np.concatenate([blocks[..., size - 16 :], d, low], axis=-1)


def load_gguf_model(
    path: Path, dtype: torch.dtype, device: torch.device, reader=None, pack=None
) -> Transformer:
    """The model of a GGUF file, dequantized to `dtype` on `device`; with `pack` (an
    `Int4Packer`), its block linears packed as they are read (offload/weights.py), Q4_0,
    Q4_1 and Q4_K ones with their own codes (`int4_rows_of`)."""
    import gguf

    reader = reader or open_gguf(path)
    args = read_gguf_args(reader, path)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in ROPE_TENSORS:
            continue
        ours = rename(t.name, _GGUF_PATTERNS)
        if ours is None:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name!r}")
        try:
            codes = int4_rows_of(t) if pack and pack.takes(ours, _weight_shape(t)) else None
            w = gguf.quants.dequantize(t.data, t.tensor_type) if codes is None else codes
        except Exception as e:
            raise ModelLoadError(
                f"{path}: cannot read tensor {t.name} ({t.tensor_type.name}): {e}"
            ) from None
        if args.arch in PERMUTED and (".attention.wq." in ours or ".attention.wk." in ours):
            heads = args.num_heads if ".wq." in ours else args.num_kv_heads
            w = _unpermute(w, heads)
        if codes is not None:  # the file's own codes, scales and minimums
            state[ours] = pack.put(ours, torch.from_numpy(np.ascontiguousarray(w)))
            continue
        # Unquantized tensors come back as read-only views of the memory map: copy.
        w = np.array(w, dtype=np.float32, order="C", copy=not w.flags.writeable)
        t = torch.from_numpy(w)
        state[ours] = pack(ours, t) if pack else t.to(device=device, dtype=dtype)
    if args.arch == "phi3":  # its ffn_up is gate and up in one: [2 F, dim]
        state = {n.replace(".w3.", ".w13."): w for n, w in state.items()}
        if pack:
            pack.rows = {n.replace(".w3.", ".w13."): r for n, r in pack.rows.items()}
    return build_model(args, split_fused(state, args), str(path), pack)


def stored_as(reader) -> str | None:
    """What the block linears were stored as (e.g. Q4_1): the type that holds most of
    their weights (a Q4_K_M file keeps some at Q6_K, and llama.cpp gives rows that are
    not whole 256-blocks another type). `weights = "auto"` follows it (quantize.py)."""
    weights: dict[str, int] = {}
    for t in reader.tensors:
        if _BLOCK_LINEAR.match(t.name):
            kind = t.tensor_type.name
            weights[kind] = weights.get(kind, 0) + int(t.n_elements)
    return max(weights, key=weights.get) if weights else None
