"""Weight-only quantized linears for CPU decode.

One decode step reads every weight once, so on a CPU it is bound by memory
bandwidth: SmolLM2's 135M parameters are 270 MB a token in bf16. Keeping the
weights at 8 or 4 bits and multiplying with torch's packed-weight CPU kernels
reads 2x or about 4x less (measured in docs/performance.md).

    int8  per output channel, symmetric:   w = scale[n] * q[n, k]          q in -127..127
    int4  per group of 32 inputs, asymmetric:
                                           w = scale[n, g] * (q - 8) + zero[n, g]   q in 0..15

The int4 form is the one llama.cpp's Q4_1 blocks use (32 weights, a scale and a
minimum, kept as float16; the CPU kernel takes them in the model's dtype), so the
embedded GGUF's block linears keep their own codes: its blocks are read into the
form as they are, as are Q4_0's and Q4_K's (offload/gguf.py `int4_rows_of`), and
re-quantizing a dequantized Q4_1 block would give back the same codes too.

Which form `weights = "auto"` picks, and how many bytes each takes:
offload/weight_forms.py. Each block linear is quantized as the loader reads it
(`Int4Packer`), so the dense model is never whole in memory. On CUDA a decode step
multiplies by the codes with offload/kernels/int4.py, and the linears keep only the
codes, scales and minimums (0.625 bytes a weight); the output head stays dense.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch
from torch import nn

from offload.kernels import int4 as int4_kernels

INT4_GROUP = 32  # inputs per scale/zero: the block size of llama.cpp's Q4_0/Q4_1
# Inputs with more rows than this (prefill chunks) multiply a weight dequantized for
# the call: the packed kernels are built for decode, and their time grows with the
# rows (at 512 rows 12x a dense matmul's), while a dequantization costs the same for
# any rows. Measured for one layer of the embedded model (its 4 linears), kernel
# against dequantization and matmul: int4 1.99 / 2.73 ms at 48 rows, 2.62 / 2.66 at
# 64; int8 0.77 / 1.17 at 16, 1.15 / 1.19 at 24 (docs/performance.md).
INT4_MAX_ROWS = 48
INT8_MAX_ROWS = 16
# torch's packed CPU kernels are fast for bf16 rows only: a float32 row of SmolLM2's
# gate/up took 1.9 ms at int4 and 1.3 at int8 against 0.18 for a float32 matmul by the
# dequantized weight, and 38 rows 70 / 38 / 1.5 ms (`dtype = "float32"` decoded the
# embedded model at 6 tokens/s; float16 alike). Other rows multiply the dequantized
# weight instead: at int8 always (dequantizing costs 0.4 ms), at int4 where it is kept
# (`keep_dense`, decided when the model loads) or for more than this many rows (3.6 ms
# to dequantize).
NOT_BF16_INT4_ROWS = 2
# (Where the dequantized weight is kept, `KEPT_DENSE_BYTES`, a dense matmul would beat
# the kernels from 16 rows at int4 and 8 at int8 here. Not taken: how a prompt is
# multiplied would then depend on whether an earlier one had made the copy, and a
# greedy answer must not depend on what came before it.)
DEQUANT_ROWS = 4096  # rows of a weight dequantized at a time (bounds the float32 temporaries)
# On the CPU, the dequantized weights that prefill chunks multiply are kept, made when a
# chunk first needs them, up to this many bytes (the block linears from the first layer,
# then the output head): the embedded model's all (212 MB beside its 80 MB of codes).
# Dequantizing them took 0.16 s of a 512-token prefill's 0.28 here, at every prompt or
# chat turn of more than `INT4_MAX_ROWS` tokens (docs/performance.md, "Kept dense weights").
KEPT_DENSE_BYTES = 1 << 30
INT4_BYTES = 0.5 + 2 * 2 / INT4_GROUP  # a weight's code, and its group's float16 scale and minimum


@functools.cache
def slow_bf16_matmul() -> bool:
    """Does this CPU lack fast bf16 matmuls? torch's own test (AVX-512 or AMX on x86,
    bf16 instructions on Arm). Where it fails, as on AVX2-only x86, a bf16 GEMM of a
    2048-row prefill chunk ran 6x slower than the same GEMM in float32 (measured,
    docs/performance.md), so prefill chunks compute in float32 there."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def slow_fp16_matmul() -> bool:
    """`slow_bf16_matmul` for float16 (AVX2 alike: a 512-row GEMM 6x float32's time)."""
    return not torch.ops.mkldnn._is_mkldnn_fp16_supported()


def chunk_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a prefill chunk `x` is multiplied and attended in: float32 for bf16 (or
    float16) on a CPU without fast matmuls in it (the KV and the results stay in x's
    dtype), else its own."""
    if x.device.type != "cpu":
        return x.dtype
    if (x.dtype == torch.bfloat16 and slow_bf16_matmul()) or (
        x.dtype == torch.float16 and slow_fp16_matmul()
    ):
        return torch.float32
    return x.dtype


def chunk_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """`linear(x, weight, bias)` for a prefill chunk, in `chunk_dtype(x)`, back in x's."""
    dt = chunk_dtype(x)
    if dt == x.dtype:
        return nn.functional.linear(x, weight, bias)
    bias = None if bias is None else bias.to(dt)
    return nn.functional.linear(x.to(dt), weight.to(dt), bias).to(x.dtype)


class DequantizedWeight:
    """The weight dequantized for prefill chunks (`dequantized`), from the linear's
    `_dequantize`, and kept where `keep_dense` says so."""

    held: torch.Tensor | None = None  # while `dequantized_once` holds it
    keep = False  # keep the weight dequantized (`keep_dense`)
    kept: torch.Tensor | None = None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [n, k] in `dtype` (what the kernels multiply by)."""
        for w in (self.held, self.kept):
            if w is not None and w.dtype == dtype:
                return w
        w = self._dequantize(dtype)
        if self.keep:
            self.kept = w
        return w


class Int8Linear(DequantizedWeight, nn.Module):
    def __init__(self, linear: nn.Linear, empty: bool = False):
        super().__init__()
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if empty:  # buffers of the right shapes, to be assigned (weight_cache.py)
            n, k = linear.weight.shape
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(n, dtype=linear.weight.dtype))
            return
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > INT8_MAX_ROWS or x.dtype != torch.bfloat16:
            return chunk_linear(x, self.dequantized(chunk_dtype(x)), self.bias)
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


def int4_nibbles(q: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Codes [n, k] (0..15) two to a byte, [n, k / group, group / 2]: byte j of a group
    holds codes j (low half) and j + group / 2 (high half)."""
    qg = q.to(torch.uint8).reshape(q.shape[0], -1, group)
    return qg[..., : group // 2] | (qg[..., group // 2 :] << 4)


def codes_of_packed(packed: torch.Tensor, n: int, k: int, rows: int | None = None) -> torch.Tensor:
    """The codes [n, k] (0..15, uint8) of torch's packed CPU form of them
    (`_convert_weight_to_int4pack_for_cpu`, [n, k / 2] bytes): the rows in blocks of
    `rows` (64 where torch's CPU kernels run AVX-512, 32 with AVX2: `packed_block`),
    each [k, rows / 2] bytes whose byte j holds rows j (low half) and j + rows / 2; the
    rows after the last whole block as [k, rest / 2] bytes whose byte j holds rows 2j
    and 2j + 1. That is torch's own layout (2.13), not a documented one: `packed_block`
    checks it in each process before the runtime relies on it."""
    rows = rows or packed_block()
    flat = packed.reshape(-1)
    full = n // rows * rows
    blocks = flat[: full * k // 2].reshape(full // rows, k, rows // 2)
    q = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(full, k)
    if full == n:
        return q
    rest = flat[full * k // 2 :].reshape(k, (n - full) // 2)
    tail = torch.stack([rest & 15, rest >> 4], dim=2).reshape(k, n - full).t()
    return torch.cat([q, tail])


@functools.cache
def packed_block() -> int | None:
    """The rows of a block of this torch's packed CPU form as `codes_of_packed` reads it
    back (codes of 208 x 96, whole blocks and a tail, packed and read back): 64 or 32,
    or None where neither reads them (the linears then keep their codes twice). Found
    2026-12-07 on an AVX2-only machine: 32 there, where AVX-512 machines pack 64."""
    # (on the CPU whatever device a caller's context sets: the weight cache builds its
    # modules under the meta device)
    q = torch.randint(0, 16, (208, 96), generator=torch.Generator().manual_seed(0), device="cpu")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    for rows in (64, 32):
        if torch.equal(codes_of_packed(packed, 208, 96, rows), q.to(torch.uint8)):
            return rows
    return None


def packed_layout_known() -> bool:
    """Does `codes_of_packed` read this torch's packed CPU form (`packed_block`)?"""
    return packed_block() is not None


def int4_rows(nibbles: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """A linear's int4 form as one tensor of bytes [n, k / 32, 20], a row per output:
    each group's codes, then its float16 scale and minimum (`Int4Linear.from_rows`)."""
    return torch.cat([nibbles, scale[..., None].view(torch.uint8),
                      lo[..., None].view(torch.uint8)], dim=-1)  # fmt: skip


def int4_parts(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`int4_rows`' parts again: the codes two to a byte, the scales, the minimums."""
    half = INT4_GROUP // 2
    scale, lo = (rows[..., i : i + 2].contiguous().view(torch.float16)[..., 0]
                 for i in (half, half + 2))  # fmt: skip
    return rows[..., :half].contiguous(), scale, lo


class Int4Linear(DequantizedWeight, nn.Module):
    """`linear` at int4, run where `device` (default: the linear's) is: on the CPU by
    torch's packed kernel, on CUDA by offload/kernels/int4.py (the linear is quantized
    there; only the codes, scales and minimums are kept). Rows past the kernel's (a
    prefill chunk) multiply the weight dequantized for the call."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP, empty: bool = False,
                 device: torch.device | None = None):  # fmt: skip
        super().__init__()
        n, k = linear.weight.shape
        device = torch.device(device or linear.weight.device)
        bias = linear.bias
        if bias is not None and not empty:  # (the kernel runs where the bias is)
            bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
        self._setup(n, k, group, linear.weight.dtype, bias)
        if empty:  # buffers of the right shapes, to be assigned (weight_cache.py)
            self.cpu_kernel = device.type == "cpu"
            g, dt = k // group, linear.weight.dtype
            skip = ("packed", "scales_zeros")  # the CPU kernel's (`pack_for_cpu`)
            if self.cpu_kernel:
                skip = ("nibbles",) if packed_layout_known() else ()
            for name, shape, dtype in (("packed", (n, k // 2), torch.uint8),
                                       ("scales_zeros", (g, n, 2), dt),
                                       ("nibbles", (n, g, group // 2), torch.uint8),
                                       ("group_scale", (n, g), torch.float16),
                                       ("group_min", (n, g), torch.float16)):  # fmt: skip
                if name not in skip:
                    self.register_buffer(name, torch.empty(shape, dtype=dtype))
            return
        q, scale, lo = int4_codes(linear.weight.to(device), group)
        self._keep(int4_nibbles(q, group), scale.half(), lo.half())
        if device.type == "cpu":
            self.pack_for_cpu(q)

    def _setup(self, n: int, k: int, group: int, dtype: torch.dtype, bias) -> None:
        self.group, self.in_features, self.out_features = group, k, n
        self.dtype = dtype  # the model's (the CPU kernel's scales are in it)
        self.cpu_kernel = False  # torch's packed CPU kernel runs it (`pack_for_cpu`)
        self.bias = bias

    def _keep(self, nibbles, scale, lo) -> None:
        """Hold the codes two to a byte and each group's float16 scale and minimum, as
        Q4_1 stores them: CUDA's kernel and prefill's dequantization read them, so the
        weight comes back as the file's."""
        self.register_buffer("nibbles", nibbles)  # [n, k / group, group / 2]
        self.register_buffer("group_scale", scale)  # [n, k / group]
        self.register_buffer("group_min", lo)

    def pack_for_cpu(self, q: torch.Tensor | None = None) -> None:
        """Add torch's packed form of the codes (`q`, [n, k], where the caller has them)
        and its scales in the model's dtype: the CPU kernel runs the linear now. Where
        `codes_of_packed` reads that form, the codes two to a byte go: prefill's
        dequantization reads the packed ones (0.75 bytes a weight instead of 1.25)."""
        q = (int4_kernels.unpacked(self.nibbles) if q is None else q).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # The kernel's convention: w = scale * (q - 8) + zero, per [group, row].
        scale, lo = self.group_scale.float(), self.group_min.float()
        sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(self.dtype).contiguous()
        self.register_buffer("scales_zeros", sz)  # [k / group, n, 2]
        self.cpu_kernel = True
        if packed_layout_known():
            del self.nibbles

    def codes(self) -> torch.Tensor:
        """The codes [n, k] (0..15), from whichever form the linear holds."""
        if "nibbles" in self._buffers:
            return int4_kernels.unpacked(self.nibbles)
        return codes_of_packed(self.packed, self.out_features, self.in_features)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """From the codes."""
        if not self.cpu_kernel and _cuda_kernel(self.nibbles):
            return int4_kernels.dequantize(self.nibbles, self.group_scale, self.group_min, dtype)
        n, k = self.out_features, self.in_features
        w = torch.empty(n, k, dtype=dtype, device=self.group_scale.device)
        q = self.codes()
        for r in range(0, n, DEQUANT_ROWS):
            rows = slice(r, r + DEQUANT_ROWS)
            w[rows] = int4_kernels.dequantize_codes(
                q[rows], self.group_scale[rows], self.group_min[rows]
            )
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel and x.shape[0] <= INT4_MAX_ROWS and not self._not_bf16_rows(x):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.group, self.scales_zeros
            )
        elif not self.cpu_kernel and x.shape[0] <= int4_kernels.MAX_ROWS and _cuda_kernel(x):
            y = int4_kernels.int4_matmul(
                x.contiguous(), self.nibbles, self.group_scale, self.group_min
            )
        else:
            return chunk_linear(x, self.dequantized(chunk_dtype(x)), self.bias)
        return y if self.bias is None else y + self.bias

    def _not_bf16_rows(self, x: torch.Tensor) -> bool:
        """Does the CPU multiply `x` by the dequantized weight, not the packed kernel,
        since its rows are not bf16 (`NOT_BF16_INT4_ROWS`)?"""
        return x.dtype != torch.bfloat16 and (self.keep or x.shape[0] > NOT_BF16_INT4_ROWS)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        """The linear from `Int4Packer`'s rows [n, k / 32, 20] (codes, scale, minimum),
        where they are, as CUDA runs it; on the CPU `quantize_model` adds the packed form
        of the CPU kernel (`pack_for_cpu`) once the model's pieces are fused. `dtype`:
        the model's."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        n, g, _ = rows.shape
        bias = bias if bias is None else nn.Parameter(bias, requires_grad=False)
        m._setup(n, g * INT4_GROUP, INT4_GROUP, dtype, bias)
        m._keep(*int4_parts(rows))
        return m

    def dense(self) -> nn.Linear:
        """The linear again, its weight dequantized in the model's dtype."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(self.dequantized(self.dtype), requires_grad=False)
        linear.bias = self.bias
        return linear

    def rows(self) -> torch.Tensor:
        """The codes, scale and minimum of each group, [n, k / 32, 16 + 2 + 2] bytes."""
        # (CUDA's form, and the CPU's pieces before `pack_for_cpu`, hold the nibbles:
        # as they are, without unpacking them)
        nibbles = self._buffers.get("nibbles")
        if nibbles is None:
            nibbles = int4_nibbles(self.codes(), self.group)
        return int4_rows(nibbles, self.group_scale, self.group_min)

    @classmethod
    def concat(cls, linears: list[Int4Linear]) -> Int4Linear:
        """One linear of `linears`' outputs in order (codes are per row: the rows of
        each), as `model._concat_linears` joins dense ones."""
        rows = torch.cat([m.rows() for m in linears])
        biases = [m.bias for m in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return cls.from_rows(rows, bias, linears[0].dtype)


class Int4Packer:
    """Block linears quantized to int4 on `device` (where the model runs) as the loader
    reads them, so that the dense model is never whole, on the device or in host
    memory: `pack(name, t)` takes a block linear's weight to `device`, keeps its codes
    in `rows` (by name, [n, k / 32, 20] bytes: the codes, then the float16 scale and
    minimum, so that the loaders' row operations, splits and reorderings, apply to
    them as to the weight) and returns a meta tensor of its shape; any other tensor
    comes back in `dtype`, in host memory. `build_model` makes `Int4Linear`s of the
    rows."""

    LINEAR = re.compile(
        r"layers\.\d+\.(attention\.w(q|k|v|o|qkv)|feed_forward\.w(1|2|3|13))\.weight$"
    )

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if not self.takes(name, t.shape):
            return t.to(dtype=self.dtype)
        q, scale, lo = int4_codes(t.to(self.device), INT4_GROUP)
        return self.put(name, int4_rows(int4_nibbles(q, INT4_GROUP), scale.half(), lo.half()))

    def takes(self, name: str, shape) -> bool:
        """Is the tensor `name` of `shape` a block linear it packs?"""
        return bool(self.LINEAR.search(name)) and len(shape) == 2 and shape[1] % INT4_GROUP == 0

    def put(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Keep a linear's rows ([n, k / 32, 20], `int4_rows`; a GGUF's own codes come
        this way) on the device; the meta tensor that stands for its weight."""
        self.rows[name] = rows.to(self.device)
        n, groups, _ = rows.shape
        return torch.empty(n, groups * INT4_GROUP, dtype=self.dtype, device="meta")

    def install(self, model: nn.Module, rows: dict[str, torch.Tensor]) -> None:
        """Replace each packed linear of `model` (its weight on the meta device) by its
        int4 form, from `rows` (`self.rows` after the loader's row operations), letting
        go of the rows as it goes."""
        self.rows = {}
        while rows:
            name, r = rows.popitem()
            path = name.removesuffix(".weight")
            parent, _, attr = path.rpartition(".")
            dense = model.get_submodule(path)
            setattr(
                model.get_submodule(parent), attr, Int4Linear.from_rows(r, dense.bias, self.dtype)
            )


@contextlib.contextmanager
def dequantized_once(module: nn.Module, dtype: torch.dtype):
    """Within: each quantized linear of `module` (a layer; and a dense bf16 or float16
    one on a CPU without fast matmuls in it, `HalfLinear`) multiplies prefill chunks of
    `dtype` by one dequantized copy of its weight, made on entry, instead of one per
    chunk. A layer-by-layer prefill runs a layer over all of a prompt's chunks
    (offload/generate.py); the copy costs one layer's dense weights while it runs."""
    linears = [m for m in module.modules() if isinstance(m, DequantizedWeight)]
    try:
        for m in linears:
            m.held = m.dequantized(dtype)
        yield
    finally:
        for m in linears:
            m.held = None


def keep_dense(model: nn.Module, budget: int = KEPT_DENSE_BYTES) -> None:
    """On the CPU: let the quantized linears keep the weight dequantized for prefill
    chunks, in module order (the first layers' first, the output head last), while
    their dense bytes stay within `budget` (`KEPT_DENSE_BYTES`)."""
    if model.device.type != "cpu":
        return  # (CUDA's dequantization is a kernel, and its memory the scarce one)
    dtype = chunk_dtype(torch.empty(0, dtype=model.dtype))
    used = 0
    for m in model.modules():
        if isinstance(m, DequantizedWeight):
            used += m.out_features * m.in_features * dtype.itemsize
            m.keep = used <= budget


def _cuda_kernel(x: torch.Tensor) -> bool:
    from offload.kernels import triton_available

    return x.is_cuda and triton_available()


def int4_fits(linear: nn.Linear, cpu: bool = True) -> bool:
    """Int4 needs whole groups of inputs; the CPU kernel also outputs in multiples of 16."""
    return linear.in_features % INT4_GROUP == 0 and (not cpu or linear.out_features % 16 == 0)


def quantize_model(
    model: nn.Module, mode: str, empty: bool = False, device: torch.device | None = None
) -> int:
    """Replace the block linears (and, on the CPU, the output head, at int8) in place;
    return how many. `device` is where the model runs (default: its own).

    On the CPU, linears the int4 kernel cannot take (`int4_fits`) get int8 instead,
    and a tied output head gets its own int8 copy, since every decode step reads it
    whole. On CUDA only int4 exists: a linear it cannot take, and the head, stay dense.
    The token embedding stays dense (it is a lookup, not a matmul). `empty` makes the
    modules only (buffers to be assigned from a saved state dict).
    """
    if mode == "dense":
        return 0
    cpu = torch.device(device or model.device).type == "cpu"
    count = 0
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, Int4Linear) and cpu and not child.cpu_kernel:
                    # (packed as it was read, and fused): the CPU kernel's form, or int8
                    # below where the kernel cannot take its outputs
                    if int4_fits(child):
                        child.pack_for_cpu()
                        count += 1
                        continue
                    child = child.dense()
                if not isinstance(child, nn.Linear):
                    continue
                if mode == "int4" and int4_fits(child, cpu):
                    setattr(parent, name, Int4Linear(child, empty=empty, device=device))
                elif cpu:
                    setattr(parent, name, Int8Linear(child, empty=empty))
                else:
                    continue
                count += 1
    if not cpu:
        return count
    model.output = Int8Linear(model.output, empty=empty)
    return count + 1
