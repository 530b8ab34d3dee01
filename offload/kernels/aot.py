"""Compile the Triton kernels for a GPU that is not here (ahead of time).

Triton compiles a kernel for a named target without a GPU: through its IRs to PTX,
and with the `ptxas` it ships to a cubin. The interpreter tests check what the kernels
compute; this checks what the interpreter cannot, on any machine: that each kernel,
with the argument types and constants the runtime launches it with, compiles for the
GPUs this runtime is for, and what it uses there (registers, spills, shared memory).

    launches(fn)              run `fn`, recording the kernel launches it makes instead
                              of running them (meta tensors do: nothing is computed)
    compile_launch(l, arch)   compile one recorded launch for an architecture (75: a T4
                              or Titan RTX, 89: an RTX 4090, 90: an H100)
    resources(compiled)       registers, spilled bytes, shared memory of the cubin

`python scripts/kernel_report.py` prints the table for the runtime's shapes.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from offload.kernels import candidates as candidate_kernels
from offload.kernels import decode_attention as attention_kernels
from offload.kernels import gather as gather_kernels
from offload.kernels import hit_cache as hit_kernels
from offload.kernels import int4 as int4_kernels
from offload.kernels import kmeans as kmeans_kernels
from offload.kernels import layer as layer_kernels
from offload.kernels import ranking
from storage.quant import QuantKeys

# Shared memory one block may use (opt-in maximum), by architecture.
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# each defines its kernels in `_kernels()`
MODULES = (
    attention_kernels,
    gather_kernels,
    hit_kernels,
    kmeans_kernels,
    candidate_kernels,
    ranking,
    layer_kernels,
    int4_kernels,
)

TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
    torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip


@dataclass
class Launch:
    kernel: object  # the triton.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    """Stands in for a module's kernel namespace: `kernel[grid](*args)` is recorded."""

    def __init__(self, real: SimpleNamespace, out: list[Launch]):
        self.real, self.out = real, out

    def __getattr__(self, name: str):
        kernel = getattr(self.real, name)
        out = self.out

        class Indexed:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: out.append(Launch(kernel, grid, args, kwargs))

        return Indexed()


def launches(fn, arch: int = 89) -> list[Launch]:
    """The kernel launches `fn()` makes, recorded, not run, configured as for a GPU of
    compute capability `arch` (its shared memory)."""
    out: list[Launch] = []
    saved = {m: m._kernels for m in MODULES}
    limit = attention_kernels.shared_limit
    try:
        for m, real in saved.items():
            m._kernels = lambda real=real: _Recorder(real(), out)
        attention_kernels.shared_limit = lambda device: SHARED_LIMIT[arch]
        fn()
    finally:
        for m, real in saved.items():
            m._kernels = real
        attention_kernels.shared_limit = limit
    return out


def _specialize(value, specialize: bool = True) -> tuple[str, object, bool]:
    """(type, constant or None, divisible by 16) of one argument, as Triton's launcher
    specializes it: an int equal to 1 becomes the constant 1, ints pick 32 or 64 bits
    (only the bits where the kernel says `do_not_specialize`)."""
    if isinstance(value, int) and not isinstance(value, bool) and not specialize:
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None, False
    if isinstance(value, torch.Tensor):
        aligned = value.storage_offset() * value.element_size() % 16 == 0
        return "*" + TYPES[value.dtype], None, aligned
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"cannot specialize a kernel argument of type {type(value).__name__}")


def compile_launch(launch: Launch, arch: int):
    """The launch's kernel compiled for compute capability `arch` (e.g. 89, 90), with the
    launch's options (`num_warps`, `num_stages`) where it gives them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        # TRITON_INTERPRET=1 makes every @triton.jit function, Triton's own helpers too, an
        # interpreted one that cannot be compiled: this needs a process without it.
        raise RuntimeError("Triton kernels compile only in a process without TRITON_INTERPRET")
    options = {k: v for k, v in launch.kwargs.items()
               if k in ("num_warps", "num_stages", "enable_fp_fusion")}  # fmt: skip
    signature, constexprs, attrs = {}, {}, {}
    fixed = {kernel.arg_names[a] if isinstance(a, int) else a for a in kernel.do_not_specialize}
    for i, name in enumerate(kernel.arg_names):
        if i >= len(launch.args):  # a keyword: a constant (`tl.constexpr`)
            signature[name], constexprs[name] = "constexpr", launch.kwargs[name]
            continue
        kind, const, aligned = _specialize(launch.args[i], name not in fixed)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = const
        elif aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(compiled) -> dict:
    """Registers per thread, stack frame and spilled bytes of a compiled kernel (what the
    `ptxas` Triton ships reports for its PTX), and its shared memory."""
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    tool = _ptxas(int(re.search(r"\d+", target).group()))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [tool, "-v", f"--gpu-name={target}", path, "-o", os.path.join(tmp, "kernel.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    frame = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log
    )
    return {
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "stack_bytes": int(frame.group(1)),
        "spill_bytes": int(frame.group(2)) + int(frame.group(3)),
        "shared_bytes": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
        "num_stages": compiled.metadata.num_stages,
    }


def _ptxas(arch: int) -> str:
    """The `ptxas` Triton compiles for `arch` with (one of the two it ships)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):  # another Triton: its one ptxas
        from triton.backends import nvidia

        return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


# The models whose shapes the runtime's launches are compiled at: (KV heads, query heads
# per KV head, head dim), and the context the buffers are sized for.
SHAPES = {"smollm2-135m": (3, 3, 64, 8192), "llama-3.1-8b": (8, 4, 128, 131072)}
DIMS = {"smollm2-135m": (576, 1536), "llama-3.1-8b": (4096, 14336)}  # (dim, hidden dim)
RETRIEVED = 2048  # tokens per KV head a tiered step gathers (the rtx4090 preset at 128k)
HIT_SLOTS = 4096  # a step hit cache's slots per KV head
CANDIDATES = 8 * RETRIEVED + 512  # reranked per KV head (candidate_factor 8, padded)


def runtime_launches(dtype: torch.dtype, arch: int) -> list[tuple[str, Launch]]:
    """Every kernel launch of a decode step, at each model's shape and at its longest
    context, as on a GPU of compute capability `arch`, recorded on meta tensors: (what it
    is, the launch)."""
    out = []
    for model, shape in SHAPES.items():
        calls = _step_calls(*shape, dtype) | _layer_calls(*shape[:3], *DIMS[model], dtype)
        for what, call in calls.items():
            recorded = launches(call, arch)
            names = [launch.name for launch in recorded]
            for i, launch in enumerate(recorded):  # a kernel launched twice: its passes
                n = names[: i + 1].count(launch.name)
                part = f", pass {n}" if names.count(launch.name) > 1 else ""
                out.append((f"{model}: {what} ({launch.name}{part})", launch))
    return out


def _step_calls(H: int, G: int, D: int, T: int, dtype: torch.dtype) -> dict:
    """The kernel calls of a decode step over meta tensors of the runtime's shapes."""

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    q, length = meta(H, G, D), meta(1, dtype=torch.long)
    kv = meta(2, H, T, D)  # a dense layer's buffer
    recent = meta(2, H, 16 + 256, D)  # a tiered step's sink and window (the preset's)
    C = 64
    slots = T // C + T // C // 8
    slab, table = meta(2, H, slots, C, D), meta(slots, dtype=torch.long)
    ids = meta(H, RETRIEVED, dtype=torch.long)
    miss = meta(H, RETRIEVED, dtype=torch.bool)
    ids2, miss2 = meta(H, 2 * RETRIEVED, dtype=torch.long), meta(H, 2 * RETRIEVED, dtype=torch.bool)
    cache = meta(2, H, HIT_SLOTS, D)
    slot_of = meta(H, T + 1, dtype=torch.int32)
    token_of, used = (
        meta(H, HIT_SLOTS + 1, dtype=torch.long),
        meta(H, HIT_SLOTS + 1, dtype=torch.long),
    )
    clock, counts = meta(H, dtype=torch.long), meta(2, dtype=torch.long)
    summaries = QuantKeys(2, 16, meta(H, T, D // 4, dtype=torch.uint8),
                          meta(H, T // 16, D, dtype=torch.float16),
                          meta(H, T // 16, D, dtype=torch.float16))  # fmt: skip
    candidates = meta(H, CANDIDATES, dtype=torch.long)
    attend, rope_store = attention_kernels.decode_attention, layer_kernels.rope_store
    qkv, cos = meta(1, H * (G + 2), D).transpose(0, 1), meta(1, D)  # (a step's projection)
    return {
        "RoPE of q and k, the new K/V into a dense layer's buffers": lambda: rope_store(
            qkv, cos, cos, kv[0], kv[1], meta(1, dtype=torch.long)
        ),
        "decode attention, dense layer": lambda: attend(q, kv[0], kv[1], length),
        "decode attention, tiered layer": lambda: attend(
            q, recent[0], recent[1], length, cache[0], cache[1], length, ids
        ),
        # (selection.reuse: the last step's ids and their successors, rows left out)
        "decode attention, tiered layer, reused selection": lambda: attend(
            q, recent[0], recent[1], length, cache[0], cache[1], length, ids2, skip=True
        ),
        "decode attention, tiered layer, no hit cache": lambda: attend(
            q, recent[0], recent[1], length, *meta(2, H, RETRIEVED, D), length
        ),
        "gather from the host slab": lambda: gather_kernels.gather_kv(slab, table, ids),
        "fetch misses into the hit cache": lambda: gather_kernels.fetch_into(
            slab, table, ids, miss, ids, cache
        ),
        "the clusters taken": lambda: ranking.take_clusters(
            meta(H, T // 16, dtype=torch.float32),
            meta(H, T // 16 + 1, dtype=torch.float32)[:, :-1],
            8,
            2048,
            length,
        ),
        # (the buffers grown by 1.25x past a power of two: twice the clusters in registers)
        "the clusters taken, grown": lambda: ranking.take_clusters(
            meta(H, T // 16 * 5 // 4, dtype=torch.float32),
            meta(H, T // 16 * 5 // 4 + 1, dtype=torch.float32)[:, :-1],
            8,
            2048,
            length,
        ),
        "the candidates of the clusters taken": lambda: candidate_kernels.cluster_candidates(
            meta(H, T // 16 + 1, dtype=torch.bool), slot_of, 16, length, CANDIDATES
        ),
        "the clusters' scores": lambda: candidate_kernels.score_clusters(
            q, meta(H, T // 16, D, dtype=torch.float32), meta(H, T // 16, dtype=torch.float32)
        ),
        "rerank the candidates on their low-bit keys": lambda: candidate_kernels.rerank_weights(
            q, summaries, candidates, meta(H, dtype=torch.long), D**-0.5
        ),
        "the tokens kept": lambda: ranking.top_ids(
            meta(H, CANDIDATES, dtype=torch.float32), candidates, RETRIEVED, length
        ),
        # (fewer candidates: a shorter context, or the embedded model's 5% of 8k; one
        # program a head)
        "the tokens kept, in registers": lambda: ranking.top_ids(
            meta(H, ranking.SPLIT_ABOVE, dtype=torch.float32),
            candidates[:, : ranking.SPLIT_ABOVE],
            RETRIEVED // 4,
            length,
        ),
        "hit cache: the lookup": lambda: hit_kernels.lookup(
            ids, length, slot_of, token_of, used, clock, counts
        ),
        "a reused selection's rows": lambda: hit_kernels.successors(ids, length),
        "hit cache: the lookup, reused selection": lambda: hit_kernels.lookup(
            ids2, length, slot_of, token_of, used, clock, counts, miss2
        ),
        # A prefill chunk's selection of its far tokens (four steps' worth; no k_valid)
        "a prefill chunk's clusters taken": lambda: ranking.take_clusters(
            meta(H, T // 16, dtype=torch.float32),
            meta(H, T // 16, dtype=torch.float32),
            8,
            4 * RETRIEVED,
            None,
        ),
        "a prefill chunk's tokens kept": lambda: ranking.top_ids(
            meta(H, 4 * CANDIDATES, dtype=torch.float32),
            meta(H, 4 * CANDIDATES, dtype=torch.long),
            4 * RETRIEVED,
            None,
        ),
        # The index build of a layer-by-layer prefill (4 segments of 8,192 keys a run)
        "the k-means' nearest centroids": lambda: kmeans_kernels.nearest(
            meta(4 * H, 8192, D, dtype=torch.float32), meta(4 * H, 512, D, dtype=torch.float32)
        ),
    }


def _layer_calls(H: int, G: int, D: int, dim: int, hidden: int, dtype: torch.dtype) -> dict:
    """The layer's elementwise kernels as a decode step calls them (a prefill chunk's
    differ only in their grid): on the fused projections' outputs."""
    x = torch.empty(1, dim, dtype=dtype, device="meta")
    qkv = torch.empty(1, H * (G + 2), D, dtype=dtype, device="meta").transpose(0, 1)
    cos = torch.empty(1, D, dtype=dtype, device="meta")
    gu = torch.empty(1, 2 * hidden, dtype=dtype, device="meta")
    w = torch.empty(dim, dtype=dtype, device="meta")
    return {
        "the norm": lambda: layer_kernels.rms_norm(x, w, 1e-5),
        "the residual sum and norm": lambda: layer_kernels.add_rms_norm(x, x, w, 1e-5),
        "RoPE of q and k": lambda: layer_kernels.rope(qkv[: H * (G + 1)], cos, cos),
        "SwiGLU": lambda: layer_kernels.silu_mul(gu),
        # (with `model.weights = "int4"`: the largest of its linears, gate and up)
        "gate and up at int4": lambda: int4_kernels.int4_matmul(
            x, *_int4_weight(2 * hidden, dim, dtype)
        ),
        "gate and up at int4, dequantized for a prefill chunk": lambda: int4_kernels.dequantize(
            *_int4_weight(2 * hidden, dim, dtype), dtype
        ),
    }


def _int4_weight(n: int, k: int, dtype: torch.dtype) -> tuple:
    """An int4 linear's buffers [n, k] on the meta device (offload/quantize.py)."""
    g = k // int4_kernels.GROUP
    nibbles = torch.empty(n, g, int4_kernels.GROUP // 2, dtype=torch.uint8, device="meta")
    scale = torch.empty(n, g, dtype=torch.float16, device="meta")
    return nibbles, scale, scale
