"""Which form a model's weights run in (`model.weights`), and how many bytes it takes.

`weights = "auto"` keeps what the file has: a GGUF whose block linears are stored at
4 bits or fewer (`INT4_SOURCES`: Q4_0, Q4_1, the K- and i-quants) runs them at int4
on the CPU, one of 5 to 8 bits (`INT8_SOURCES`) at int8; everything else stays
dense. On CUDA, `auto` keeps the weights dense while they leave `DENSE_ROOM` of the
device free, and runs the block linears at int4 otherwise (a 12-14B model on a 24 GB
card). The forms themselves: offload/quantize.py.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.config import WEIGHT_MODES
from offload.errors import ConfigError
from offload.quantize import INT4_BYTES, DequantizedWeight, chunk_dtype, chunk_linear

# On CUDA, what dense weights must leave free for `auto` to keep them dense: the
# activations reserve (1 GiB, offload/plan.py) and 2 GiB of KV (sink, window, the dense
# layers, the selection's index at a long context).
DENSE_ROOM = 3 << 30
# Rows a dense bf16 (float16) linear multiplies in its dtype on a CPU without fast
# matmuls in it; more (a prefill chunk) in float32 (`HalfLinear`). There, SmolLM2's
# gate/up projection (576 -> 3072): 16 rows 3.3 ms in bf16, 2.0 converting the weight
# to float32 for the call, 0.8 with it kept; 512 rows 118 / 16 / 14 ms; an 8B-shaped
# 4096 x 4096 crosses at about 32 rows converting (25 / 42 ms at 16 rows, 75 / 43 at 48).
HALF_MAX_ROWS = 16
# GGUF types of 4 bits a weight or fewer, which `auto` runs at int4 on the CPU: Q4_0,
# Q4_1 and Q4_K (Q4_K_M's) with their own codes (offload/gguf.py `int4_rows_of`), the
# other K-quants and the i-quants rounded to Q4_1's form; dense bf16 would hold and
# read 3-4x the bytes.
INT4_SOURCES = frozenset(
    "Q4_0 Q4_1 Q2_K Q3_K Q4_K IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS "
    "TQ1_0 TQ2_0 MXFP4".split()
)
# GGUF types of 5 to 8 bits, which `auto` runs at int8 (per output channel) on the CPU:
# half the bytes of bf16; the embedded model rewritten at Q8_0 (Q5_0) scores a 2,048-token
# perplexity 0.06% (0.6%) above its dense weights (scripts/eval_weight_forms.py).
INT8_SOURCES = frozenset("Q5_0 Q5_1 Q5_K Q6_K Q8_0 Q8_K".split())


def resolve_weights(
    mode: str, source_quant: str | None, device: torch.device, dense_bytes: int = 0
) -> str:
    """The weight form to run: `auto` follows the file on the CPU (GGUF block linears of
    4 bits or fewer, `INT4_SOURCES` -> int4; of 5 to 8, `INT8_SOURCES` -> int8); on CUDA
    it is dense while `dense_bytes` leave `DENSE_ROOM` of the device free, else int4."""
    if mode not in WEIGHT_MODES:
        raise ConfigError(f"model.weights: {mode!r} is not one of {', '.join(WEIGHT_MODES)}")
    if device.type != "cpu":
        if mode == "int8":
            raise ConfigError(
                f"model.weights: 'int8' uses torch's CPU kernels; on {device.type} use "
                "dense, int4 or auto"
            )
        if mode == "auto":
            return "dense" if dense_fits(dense_bytes, device_free_bytes(device)) else "int4"
        return mode
    if mode == "auto":
        if source_quant in INT4_SOURCES:
            return "int4"
        return "int8" if source_quant in INT8_SOURCES else "dense"
    return mode


def device_free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def dense_fits(dense_bytes: int, device_bytes: int) -> bool:
    """Does `auto` keep dense weights of `dense_bytes` on a device of `device_bytes` (free)?"""
    return dense_bytes + DENSE_ROOM <= device_bytes


def weight_bytes(args, dtype_bytes: int, mode: str) -> int:
    """The model's weights in `mode` (`dense` or `int4`, as on CUDA: the block linears
    at int4, the rest dense)."""
    from offload.loading import count_parameters

    dense = count_parameters(args)
    if mode == "dense":
        return dense * dtype_bytes
    linears = linear_parameters(args)
    return int((dense - linears) * dtype_bytes + linears * INT4_BYTES)


def linear_parameters(args) -> int:
    """The weights of the block linears (q, k, v, o, gate, up, down) of every layer."""
    qkvo = args.head_dim * (2 * args.num_heads + 2 * args.num_kv_heads)
    return args.num_layers * args.dim * (qkvo + 3 * args.hidden_dim)


class HalfLinear(DequantizedWeight, nn.Linear):
    """A dense bf16 (or float16) linear on a CPU without fast matmuls in it
    (`chunk_dtype`: AVX2 without AVX-512), where torch emulates them: a prefill chunk's
    rows (more than `HALF_MAX_ROWS`) multiply its weight in float32, converted for the
    call, or once a layer, or kept (`keep_dense`), as the quantized linears' prefill
    does; a decode step's multiply the weight as it is. The embedded model at dense
    bf16 weights ingested 2,607 tokens in 40 s, with its linears so in 8.4 s."""

    @classmethod
    def of(cls, linear: nn.Linear) -> HalfLinear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias  # (the same parameters: ties hold)
        return m

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= HALF_MAX_ROWS * x.shape[-1]:
            return nn.functional.linear(x, self.weight, self.bias)
        return chunk_linear(x, self.dequantized(chunk_dtype(x)), self.bias)


def float32_chunks(model) -> None:
    """On a CPU without fast bf16 (float16) matmuls, a bf16 (float16) model's dense
    linears (its block linears at `weights = "dense"`, a dense output head) become
    `HalfLinear`s."""
    if chunk_dtype(torch.empty(0, dtype=model.dtype, device=model.device)) == model.dtype:
        return
    parents = [m for block in model.layers for m in (block.attention, block.feed_forward)]
    for parent in (*parents, model):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, HalfLinear.of(child))
