"""Low-bit key summaries: packing, error bounds, and ranking agreement with exact scores."""

import pytest
import torch

from storage.abstracts import chunk_abstracts, upper_bound_scores
from storage.quant import (
    dequantize_keys,
    gather_head_rows,
    keys_at,
    pack,
    quantize_keys,
    score_keys,
    unpack,
)


def keys(H=3, T=512, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, T, D, generator=g)
    k[:, :, 5] *= 8  # an outlier channel, as real keys have
    return k


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (3, 10, 64), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8
    )
    packed = pack(codes, bits)
    assert packed.shape == (3, 10, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_error_bound_is_half_a_step(bits):
    k = keys()
    qk = quantize_keys(k, bits, group=16)
    err = (dequantize_keys(qk) - k).abs()
    step = qk.scale.float().repeat_interleave(16, dim=1)  # [H, T, D]
    assert torch.all(err <= step / 2 + 1e-5)
    assert qk.nbytes() == k.shape[0] * k.shape[1] * (64 * bits // 8) + 2 * 3 * (512 // 16) * 64 * 2


@pytest.mark.parametrize("bits, min_recall", [(4, 0.9), (2, 0.7)])
def test_scores_on_packed_codes_rank_like_exact(bits, min_recall):
    k = keys(T=1024)
    q = torch.randn(3, 3, 64, generator=torch.Generator().manual_seed(9))  # [H, G, D]
    qk = quantize_keys(k, bits, group=16)
    approx = score_keys(qk, q)
    # scoring the packed codes equals scoring the dequantized keys
    torch.testing.assert_close(
        approx, torch.einsum("hgd,htd->hgt", q, dequantize_keys(qk)), atol=1e-3, rtol=1e-4
    )
    exact = torch.einsum("hgd,htd->hgt", q, k)
    top = 64
    recalls = []
    for h in range(3):
        for g in range(3):
            a = set(approx[h, g].topk(top).indices.tolist())
            e = set(exact[h, g].topk(top).indices.tolist())
            recalls.append(len(a & e) / top)
    assert sum(recalls) / len(recalls) >= min_recall


def test_head_rows_and_summary_keys_are_gathered_as_by_index():
    """One index_select over a narrowed [H, capacity, X] buffer (no copy), an expanded
    gather where the rows are not contiguous; the same rows either way."""
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(3, 40, 8, generator=g)
    ids = torch.randint(0, 25, (3, 17), generator=g)
    for t in (buf, buf[:, :25], buf[:1, :25], buf.transpose(1, 2)[:, :, :5]):
        i = ids[: t.shape[0]] % t.shape[1]
        want = torch.stack([t[h, i[h]] for h in range(t.shape[0])])
        assert torch.equal(gather_head_rows(t, i), want)
    k = torch.randn(2, 64, 16, generator=g)
    qk = quantize_keys(k, 2, group=16)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    full = dequantize_keys(qk)
    torch.testing.assert_close(keys_at(qk, ids), torch.stack([full[h, ids[h]] for h in range(2)]))


def test_chunk_upper_bound_bounds_every_token():
    k = keys(T=128)
    q = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(4))
    bound = upper_bound_scores(chunk_abstracts(k, 16), q)  # [H, G, n]
    exact = torch.einsum("hgd,htd->hgt", q, k).reshape(3, 2, 8, 16)
    assert torch.all(exact.amax(-1) <= bound + 1e-4)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_packed_linear_prefill_rows_match_the_decode_kernel(kind):
    """Many rows (a prefill chunk) go through a weight dequantized for the call; a few rows
    (decode) through torch's packed kernel. Both multiply by the same quantized weight."""
    from offload.quantize import INT4_MAX_ROWS, INT8_MAX_ROWS, Int4Linear, Int8Linear, int4_codes

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    packed = (Int4Linear if kind == "int4" else Int8Linear)(linear)
    x = torch.randn((INT4_MAX_ROWS if kind == "int4" else INT8_MAX_ROWS) + 1, 64)
    x = x.to(torch.bfloat16)
    many = packed(x)  # the dequantized path
    rows = torch.cat([packed(x[i : i + 1]) for i in range(x.shape[0])])  # the kernel, per row
    torch.testing.assert_close(many.float(), rows.float(), atol=0.03, rtol=0.02)
    # and both are the linear up to quantization error
    assert (many.float() - linear(x).float()).abs().max() < 0.1 * linear(x).float().abs().max()
    if kind == "int4":
        q, scale, lo = int4_codes(linear.weight)
        w = (scale[..., None] * q.float().reshape(48, -1, 32) + lo[..., None]).reshape(48, 64)
        torch.testing.assert_close(packed.dequantized(torch.float32), w, atol=0.02, rtol=0.02)


def test_rows_not_bf16_multiply_the_dequantized_weight_on_the_cpu(monkeypatch):
    """torch's packed CPU kernels are fast for bf16 rows only (a float32 row took 10x a
    float32 matmul): float32 and float16 rows multiply the dequantized weight, at int8
    always, at int4 where it is kept or for more than `NOT_BF16_INT4_ROWS` rows; bf16
    rows (and a float32 row of an int4 weight not kept: dequantizing costs more) the
    kernel."""
    from offload import quantize
    from offload.quantize import NOT_BF16_INT4_ROWS, DequantizedWeight, Int4Linear, Int8Linear

    calls = []
    real = DequantizedWeight.dequantized
    monkeypatch.setattr(DequantizedWeight, "dequantized",
                        lambda self, dt: calls.append(dt) or real(self, dt))  # fmt: skip
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    bf16 = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    fp16 = torch.nn.Linear(64, 48, bias=True).to(torch.float16)
    for packed, keep, rows, dense in (
        (Int8Linear(linear), False, 1, True),
        (Int8Linear(fp16), False, 1, True),
        (Int4Linear(fp16), True, 1, True),
        (Int4Linear(linear), True, 1, True),
        (Int4Linear(linear), False, NOT_BF16_INT4_ROWS + 1, True),
        (Int4Linear(linear), False, NOT_BF16_INT4_ROWS, False),
        (Int4Linear(bf16), True, 1, False),
    ):
        packed.keep = keep
        x = torch.randn(rows, 64).to(packed.bias.dtype)
        calls.clear()
        got = packed(x)
        assert bool(calls) == dense, (type(packed).__name__, keep, rows, x.dtype)
        if dense:  # (in float32: where float16 matmuls are slow, as here, a prefill's way)
            w = packed.dequantized(quantize.chunk_dtype(x))
            want = quantize.chunk_linear(x, w, packed.bias)
            assert got.dtype == x.dtype and torch.equal(got, want)


@pytest.mark.parametrize("slow", [True, False])
def test_prefill_chunks_compute_in_float32_where_bf16_matmuls_are_slow(monkeypatch, slow):
    """On a CPU without fast bf16 matmuls a bf16 prefill chunk is multiplied in float32,
    and a prompt's first chunk attended in float32 (results back in bf16; a short chunk
    after earlier keys: tests/test_cpu_half.py); elsewhere in bf16. Decode rows are
    unchanged."""
    import offload.quantize as quantize
    from offload.attention import gqa_attention

    monkeypatch.setattr(quantize, "slow_bf16_matmul", lambda: slow)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    packed = quantize.Int4Linear(linear)
    x = torch.randn(quantize.INT4_MAX_ROWS + 1, 64).to(torch.bfloat16)
    assert quantize.chunk_dtype(x) == (torch.float32 if slow else torch.bfloat16)
    assert quantize.chunk_dtype(x.float()) == torch.float32
    w = packed.dequantized(quantize.chunk_dtype(x))
    want = torch.nn.functional.linear(x.to(w.dtype), w, linear.bias.to(w.dtype))
    got = packed(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=0, rtol=0)
    q, k, v = (torch.randn(4, 8, 16).to(torch.bfloat16) for _ in range(3))
    k, v = k[:2], v[:2]
    out = gqa_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = gqa_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    if slow:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=0.02, rtol=0.02)
