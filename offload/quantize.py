"""Weight-only quantized linears for CPU decode.

One decode step reads every weight once, so on a CPU it is bound by memory
bandwidth: SmolLM2's 135M parameters are 270 MB a token in bf16. Keeping the
weights at 8 or 4 bits and multiplying with torch's packed-weight CPU kernels
reads 2x or about 4x less (measured in docs/performance.md).

    int8  per output channel, symmetric:   w = scale[n] * q[n, k]          q in -127..127
    int4  per group of 32 inputs, asymmetric:
                                           w = scale[n, g] * (q - 8) + zero[n, g]   q in 0..15

The int4 form is the one llama.cpp's Q4_1 blocks use (32 weights, a scale and a
minimum), so the embedded GGUF's block linears come back with their own codes:
re-quantizing a dequantized Q4_1 block gives back the same scale, minimum and
codes (up to scale and zero being kept in bf16 here).

`weights = "auto"` keeps what the file has: a GGUF whose block linears are
4-bit runs them at int4 on the CPU; everything else stays dense. On CUDA the
weights stay dense (bf16 matmuls there are not the bottleneck this fixes).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from offload.config import WEIGHT_MODES
from offload.errors import ConfigError

INT4_GROUP = 32  # inputs per scale/zero: the block size of llama.cpp's Q4_0/Q4_1
# Inputs with more rows than this (prefill chunks) multiply a weight dequantized for
# the call: the packed kernels are built for decode, and their time grows with the
# rows (at 512 rows 12x a dense matmul's), while a dequantization costs the same for
# any rows. Measured for one layer of the embedded model (its 4 linears), kernel
# against dequantization and matmul: int4 1.99 / 2.73 ms at 48 rows, 2.62 / 2.66 at
# 64; int8 0.77 / 1.17 at 16, 1.15 / 1.19 at 24 (docs/performance.md).
INT4_MAX_ROWS = 48
INT8_MAX_ROWS = 16


@functools.cache
def slow_bf16_matmul() -> bool:
    """Does this CPU lack fast bf16 matmuls? torch's own test (AVX-512 or AMX on x86,
    bf16 instructions on Arm). Where it fails, as on AVX2-only x86, a bf16 GEMM of a
    2048-row prefill chunk ran 6x slower than the same GEMM in float32 (measured,
    docs/performance.md), so prefill chunks compute in float32 there."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def chunk_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a prefill chunk `x` is multiplied and attended in: float32 for bf16 on a
    CPU without fast bf16 matmuls (the KV and the results stay bf16), else its own."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and slow_bf16_matmul():
        return torch.float32
    return x.dtype


def chunk_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """`linear(x, weight, bias)` for a prefill chunk, in `chunk_dtype(x)`, back in x's."""
    dt = chunk_dtype(x)
    if dt == x.dtype:
        return nn.functional.linear(x, weight, bias)
    bias = None if bias is None else bias.to(dt)
    return nn.functional.linear(x.to(dt), weight.to(dt), bias).to(x.dtype)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, empty: bool = False):
        super().__init__()
        self.bias = linear.bias
        self.out_features = linear.out_features
        if empty:  # buffers of the right shapes, to be assigned (weight_cache.py)
            n, k = linear.weight.shape
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(n, dtype=linear.weight.dtype))
            return
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > INT8_MAX_ROWS:
            dt = chunk_dtype(x)
            return chunk_linear(x, self.qweight.to(dt) * self.scale.to(dt)[:, None], self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)
        return y if self.bias is None else y + self.bias


def int4_codes(w: torch.Tensor, group: int = INT4_GROUP):
    """[n, k] weights -> codes [n, k] int32 in 0..15, scale and minimum [n, k / group] (fp32)."""
    w = w.detach().float()
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp_(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, lo


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP, empty: bool = False):
        super().__init__()
        n, k = linear.weight.shape
        self.group = group
        self.bias = linear.bias
        self.out_features = n
        if empty:  # buffers of the right shapes, to be assigned (weight_cache.py)
            g, dt = k // group, linear.weight.dtype
            for name, shape, dtype in (("packed", (n, k // 2), torch.uint8),
                                       ("scales_zeros", (g, n, 2), dt),
                                       ("nibbles", (n, g, group // 2), torch.uint8),
                                       ("group_scale", (n, g), torch.float16),
                                       ("group_min", (n, g), torch.float16)):  # fmt: skip
                self.register_buffer(name, torch.empty(shape, dtype=dtype))
            return
        q, scale, lo = int4_codes(linear.weight, group)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # The kernel's convention: w = scale * (q - 8) + zero, per [group, row].
        zero = lo + 8 * scale
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(linear.weight.dtype).contiguous()
        self.register_buffer("scales_zeros", sz)  # [k / group, n, 2]
        # For prefill's dequantization (the kernel's packed layout is its own): the codes
        # two to a byte (byte j of a group holds codes j and j + group / 2), and scale and
        # minimum in float16, as Q4_1 stores them, so the weight comes back as the file's.
        qg = q.to(torch.uint8).reshape(n, -1, group)
        self.register_buffer("nibbles", qg[..., : group // 2] | (qg[..., group // 2 :] << 4))
        self.register_buffer("group_scale", scale.to(torch.float16))  # [n, k / group]
        self.register_buffer("group_min", lo.to(torch.float16))

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [n, k] in `dtype`, from the codes (what the kernel multiplies by)."""
        q = torch.cat([self.nibbles & 15, self.nibbles >> 4], dim=-1).float()  # [n, k/g, g]
        w = q.mul_(self.group_scale.float()[..., None]).add_(self.group_min.float()[..., None])
        return w.reshape(self.out_features, -1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > INT4_MAX_ROWS:
            return chunk_linear(x, self.dequantized(chunk_dtype(x)), self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group, self.scales_zeros
        )
        return y if self.bias is None else y + self.bias


def int4_fits(linear: nn.Linear) -> bool:
    """The CPU int4 kernel needs whole groups of inputs and outputs in multiples of 16."""
    return linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0


def resolve_weights(mode: str, source_quant: str | None, device: torch.device) -> str:
    """The weight form to run: `auto` follows the file (4-bit GGUF blocks -> int4) on CPU."""
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"model.weights: {mode!r} is not one of {', '.join(WEIGHT_MODES)}")
    if device.type != "cpu":
        if mode in ("int8", "int4"):
            raise ConfigError(
                f"model.weights: {mode!r} uses torch's CPU kernels; on {device.type} use dense"
            )
        return "dense"
    if mode == "auto":
        return "int4" if source_quant in ("Q4_0", "Q4_1") else "dense"
    return mode


def quantize_model(model: nn.Module, mode: str, empty: bool = False) -> int:
    """Replace the block linears (and the output head, at int8) in place; return how many.

    Linears the int4 kernel cannot take (`int4_fits`) get int8 instead. The
    token embedding stays dense (it is a lookup, not a matmul); a tied output head
    gets its own int8 copy, since every decode step reads it whole. `empty` makes
    the modules only (buffers to be assigned from a saved state dict).
    """
    if mode == "dense":
        return 0
    count = 0
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if mode == "int4" and int4_fits(child):
                    setattr(parent, name, Int4Linear(child, empty=empty))
                else:
                    setattr(parent, name, Int8Linear(child, empty=empty))
                count += 1
    model.output = Int8Linear(model.output, empty=empty)
    return count + 1
