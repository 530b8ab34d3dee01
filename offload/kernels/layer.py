"""A decoder layer's elementwise work, each in one kernel: the norms, RoPE, SwiGLU.

    rms_norm(x, w, eps)          w * rmsnorm(x)                x [S, dim] -> [S, dim]
    add_rms_norm(x, y, w, eps)   h = x + y, and w * rmsnorm(h) -> (h, normed)
    rope(qk, cos, sin)           qk * cos + rotate_half(qk) * sin
                                 qk [H, S, D] (any strides, last dim contiguous),
                                 cos, sin [S, D] -> [H, S, D] contiguous
    silu_mul(gu)                 silu(gate) * up of gu = [gate | up]  [S, 2F] -> [S, F]
    linear_add(x, linear, r)     r + linear(x): the residual sum in the matmul's epilogue
                                 (`addmm`, one cuBLAS call) where `linear` is a plain
                                 `nn.Linear` without bias (else the two operations)
    rope_store(qkv, cos, sin, K, V, pos)
                                 RoPE of q and k, and a fixed-shape step's store of the
                                 rotated k and of v into its buffers at the device
                                 positions pos, in one launch -> rotated q (in torch:
                                 RoPE, then an `index_copy_` each, `store_kv_ref`)

In torch each is several kernels (a norm: the cast to float32, the norm, the cast back,
the scale; RoPE: five), and inside a replayed CUDA graph every kernel still costs the
GPU a few microseconds however little it does: at batch 1 a decode step is bound by
their count as much as by its weights (docs/gpu.md). These take a dense layer's
decode step from about 26 kernels to 10 (the K/V store in the RoPE launch).

Each Triton kernel rounds where the reference rounds (to the model dtype after each
torch operation: HF's order, normalise in float32, cast, then scale), so in bfloat16
they agree with the references but for the order of a norm's sum and the last bit of
an exponential; `linear_add`'s `addmm` rounds the product and the sum once, not
twice. The references are the CPU path (`REFERENCE`) and what the tests compare
the kernels with in Triton's interpreter.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from offload.kernels import FP_FUSION, interpreted

ROPE_HEADS = 16  # heads per RoPE program (a program per position and block of heads)
SILU_BLOCK = 1024  # features per SwiGLU program
# Rows (positions) per program: one on a GPU, where a row is work enough for a program;
# in Triton's interpreter, which runs the programs one after another, each operation a
# numpy call of a program's block, a prefill chunk's rows in a few programs (a 384-row
# RoPE took 5 s there in programs of one row, 0.1 s in programs of 64), same results.
ROWS = 1
INTERPRETED_ROWS = 64


def _rows_per_program(rows: int) -> int:
    """Rows a program takes of a launch over `rows` (a power of two)."""
    if not interpreted():
        return ROWS
    import triton

    return min(INTERPRETED_ROWS, triton.next_power_of_2(rows))


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 as HF does, then scale in the model dtype.
    xf = x.float()
    if x.device.type != "cpu":  # (one fused kernel on a GPU)
        return w * F.rms_norm(xf, (x.shape[-1],), eps=eps).to(x.dtype)
    # On the CPU, the operations of torch's own `rms_norm` there (the same results, bit
    # for bit) without its dispatch through `rms_norm` and `_fused_rms_norm`: a decode
    # step's 61 norms took 45 -> 30 us each (the embedded model, 2 threads), 2-3% of it.
    return w * (xf * xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()).to(x.dtype)


def add_rms_norm_ref(x, y, w, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + y
    return h, rms_norm_ref(h, w, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return qk * cos + rotate_half(qk) * sin


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_add_ref(x: torch.Tensor, linear, r: torch.Tensor) -> torch.Tensor:
    return r + linear(x)


def store_kv_ref(k, v, K, V, pos) -> None:
    K.index_copy_(1, pos, k)
    V.index_copy_(1, pos, v)


def rope_store_ref(qkv, cos, sin, K, V, pos, rope=rope_ref, store=store_kv_ref) -> torch.Tensor:
    """qkv [Hq + 2 * Hkv, S, D] (q, k, v heads; any strides, last dim contiguous), K, V
    [Hkv, T, D] -> rotated q [Hq, S, D]; the rotated k and v written at pos [S] of K, V
    (with the `rope` and `store` given)."""
    Hkv = K.shape[0]
    Hq = qkv.shape[0] - 2 * Hkv
    qk = rope(qkv[: Hq + Hkv], cos, sin)
    store(qk[Hq:], qkv[Hq + Hkv :], K, V, pos)
    return qk[:Hq]


REFERENCE = SimpleNamespace(
    rms_norm=rms_norm_ref,
    add_rms_norm=add_rms_norm_ref,
    rope=rope_ref,
    silu_mul=silu_mul_ref,
    linear_add=linear_add_ref,
)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, dim] with a contiguous last dim (a view where it can be)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm(x, y, w, eps: float):
    import triton

    shape = x.shape
    x2 = _rows(x)
    S, N = x2.shape
    assert w.shape == (N,) and w.stride(0) == 1, (w.shape, w.stride())
    out = torch.empty(S, N, dtype=torch.promote_types(w.dtype, x.dtype), device=x.device)
    # (without a residual, x stands in for y and h: the kernel reads neither)
    y2 = x2 if y is None else _rows(y)
    h = x2 if y is None else torch.empty(S, N, dtype=x.dtype, device=x.device)
    BLOCK, ROWS = triton.next_power_of_2(N), _rows_per_program(S)
    _kernels().norm[(triton.cdiv(S, ROWS),)](
        x2, y2, h, w, out, S, N, x2.stride(0), y2.stride(0), N, N, eps, RESIDUAL=y is not None,
        BLOCK=BLOCK, ROWS=ROWS, num_warps=min(16, max(1, BLOCK // 256)),
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out.view(shape) if y is None else (h.view(shape), out.view(shape))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton kernel of `rms_norm_ref`: one program per row (per `ROWS`)."""
    return _norm(x, None, w, eps)


def add_rms_norm(x, y, w, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel of `add_rms_norm_ref`: the residual sum is written and normed in
    one pass over the row."""
    assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
    return _norm(x, y, w, eps)


def rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Triton kernel of `rope_ref`: one program per (position, block of heads) (per `ROWS`
    positions), both halves of each head's row at once."""
    return _rope(qk, cos, sin, qk.shape[0])


def rope_store(qkv, cos, sin, K, V, pos) -> torch.Tensor:
    """The Triton kernel of `rope_store_ref`: `rope`'s programs over the q, k and v heads,
    the k and v heads' rows (k rotated) written to K, V at the device positions pos."""
    Hkv = K.shape[0]
    assert V.shape[0] == Hkv and K.stride(2) == V.stride(2) == 1 and pos.shape == qkv.shape[1:2]
    return _rope(qkv, cos, sin, qkv.shape[0] - 2 * Hkv, K, V, pos)


def _rope(qkv, cos, sin, Hq: int, K=None, V=None, pos=None) -> torch.Tensor:
    import triton

    H, S, D = qkv.shape
    assert D % 2 == 0 and qkv.stride(2) == 1, (qkv.shape, qkv.stride())
    assert cos.shape == sin.shape == (S, D) and cos.stride() == sin.stride(), (cos.shape, sin.shape)
    assert cos.stride(1) == 1 and cos.dtype == sin.dtype == qkv.dtype, (cos.stride(), cos.dtype)
    out = torch.empty(Hq, S, D, dtype=qkv.dtype, device=qkv.device)
    store = K is not None
    K, V, pos = (K, V, pos) if store else (out, out, out)  # (pointers not read: no store)
    ROWS = _rows_per_program(S)
    grid = (triton.cdiv(S, ROWS), triton.cdiv(H, ROPE_HEADS))
    _kernels().rope[grid](
        qkv, cos, sin, out, K, V, pos, S, H, Hq, qkv.stride(0), qkv.stride(1), cos.stride(0),
        S * D, D, K.stride(0), K.stride(1), V.stride(0), V.stride(1), HALF=D // 2,
        BLOCK_H=ROPE_HEADS, BLOCK_D=triton.next_power_of_2(D // 2), ROWS=ROWS, STORE=store,
        enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """The Triton kernel of `silu_mul_ref`: one program per (row, block of features)
    (per `ROWS` rows)."""
    import triton

    shape = gu.shape
    g2 = _rows(gu)
    S, F2 = g2.shape
    assert F2 % 2 == 0, shape
    F_ = F2 // 2
    out = torch.empty(S, F_, dtype=gu.dtype, device=gu.device)
    ROWS = _rows_per_program(S)
    grid = (triton.cdiv(S, ROWS), triton.cdiv(F_, SILU_BLOCK))
    _kernels().silu_mul[grid](g2, out, S, F_, g2.stride(0), F_, BLOCK=SILU_BLOCK, ROWS=ROWS,
                              enable_fp_fusion=FP_FUSION)  # fmt: skip
    return out.view(*shape[:-1], F_)


def linear_add(x: torch.Tensor, linear, r: torch.Tensor) -> torch.Tensor:
    """`linear_add_ref` as one `addmm` (r as its C: rounded once, not after the product
    and again after the sum) where it applies."""
    if type(linear) is not torch.nn.Linear or linear.bias is not None:  # (int4/int8 linears)
        return linear_add_ref(x, linear, r)
    shape = r.shape
    out = torch.addmm(r.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1]), linear.weight.t())
    return out.view(shape)


KERNELS = SimpleNamespace(
    rms_norm=rms_norm,
    add_rms_norm=add_rms_norm,
    rope=rope,
    silu_mul=silu_mul,
    linear_add=linear_add,
)


@functools.cache
def _kernels() -> SimpleNamespace:
    """Define the Triton kernels on first use (so importing this module needs no triton,
    and `TRITON_INTERPRET` is read when the kernel is first wanted)."""
    import triton
    import triton.language as tl

    @triton.jit
    def norm(X, Y, H, W, OUT, S, N, sx, sy, sh, so, eps,
             RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        row = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        mask = (row < S) & (cols < N)
        x = tl.load(X + row * sx + cols, mask=mask, other=0.0)
        if RESIDUAL:  # h = x + y in the model dtype, as torch rounds it; normed from there
            y = tl.load(Y + row * sy + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(H + row * sh + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / N + eps)
        normed = (xf * rstd[:, None]).to(X.dtype.element_ty)
        w = tl.load(W + cols, mask=cols < N, other=0.0)
        out = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(OUT + row * so + cols, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def rope(QK, COS, SIN, OUT, K, V, POS, S, H, Hq, sh, ss, sc, so_h, so_s, sk_h, sk_t, sv_h,
             sv_t, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
             ROWS: tl.constexpr, STORE: tl.constexpr):  # fmt: skip
        # [positions, heads, half a head's dims]
        s = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None, None]
        h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :, None]
        d = tl.arange(0, BLOCK_D)[None, None, :]
        smask = (s < S) & (d < HALF)
        mask = smask & (h < H)
        src = QK + h.to(tl.int64) * sh + s * ss + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(COS + s * sc + d, mask=smask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + s * sc + HALF + d, mask=smask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + s * sc + d, mask=smask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + s * sc + HALF + d, mask=smask, other=0.0).to(tl.float32)
        dt = OUT.dtype.element_ty
        # qk * cos and rotate_half(qk) * sin each rounded to the model dtype, then summed
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        hq = h.to(tl.int64)
        dst = OUT + hq * so_h + s * so_s + d
        tl.store(dst, o1.to(dt), mask=mask & (hq < Hq))
        tl.store(dst + HALF, o2.to(dt), mask=mask & (hq < Hq))
        if STORE:  # heads Hq.. are k (rotated) and v (as they are), rows of K, V at pos[s]
            t = tl.load(POS + s, mask=s < S, other=0)
            Hkv = (H - Hq) // 2
            kh = hq - Hq
            is_k = mask & (kh >= 0) & (kh < Hkv)
            dst = K + kh * sk_h + t * sk_t + d
            tl.store(dst, o1.to(dt), mask=is_k)
            tl.store(dst + HALF, o2.to(dt), mask=is_k)
            is_v = mask & (kh >= Hkv)
            dst = V + (kh - Hkv) * sv_h + t * sv_t + d
            tl.store(dst, x1.to(dt), mask=is_v)
            tl.store(dst + HALF, x2.to(dt), mask=is_v)

    @triton.jit
    def silu_mul(GU, OUT, S, F, sg, so, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        s = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
        j = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
        mask = (s < S) & (j < F)
        g = tl.load(GU + s * sg + j, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + s * sg + F + j, mask=mask, other=0.0).to(tl.float32)
        dt = OUT.dtype.element_ty
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # silu, rounded as torch's
        tl.store(OUT + s * so + j, (act * u).to(dt), mask=mask)

    return SimpleNamespace(norm=norm, rope=rope, silu_mul=silu_mul)
