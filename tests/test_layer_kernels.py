"""The layer's elementwise kernels (offload/kernels/layer.py: the norms, RoPE, SwiGLU)
against their torch references, in Triton's interpreter on the CPU and compiled on CUDA,
and the model run with them against the model run with the references.

In float32 the kernels equal the references to float32 rounding. In bfloat16 they round
where the references round, which the interpreter shows only to one unit in the last
place: it converts float32 to bfloat16 by truncation, where a GPU (and torch) rounds to
nearest."""

import pytest
import torch

from offload import Runtime
from offload.backend import Backend
from offload.generate import prefill
from offload.kernels import layer as L
from tests.conftest import DEVICE

BF16 = dict(rtol=2**-6, atol=2**-6)  # two units in the last place of bfloat16 near 1
F32 = dict(rtol=1e-6, atol=1e-6)


def _close(dtype):
    return BF16 if dtype == torch.bfloat16 else F32


def _randn(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


@pytest.fixture(params=[1, 4], ids=["row-a-program", "4-rows-a-program"])
def rows_per_program(request, monkeypatch):
    """Rows (positions) a program takes: one, as on a GPU; and several, as in the
    interpreter (a prefill chunk's rows in a few programs), the last program's partly."""
    monkeypatch.setattr(L, "ROWS", request.param)
    monkeypatch.setattr(L, "INTERPRETED_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,dim", [(1, 576), (7, 100), (3, 1024)])
def test_norms_equal_their_references(dtype, rows, dim, rows_per_program):
    g = torch.Generator().manual_seed(rows * dim)
    x, y = _randn(g, rows, dim, dtype=dtype), _randn(g, rows, dim, dtype=dtype, scale=3)
    w = 1 + _randn(g, dim, dtype=dtype, scale=0.1)
    torch.testing.assert_close(L.rms_norm(x, w, 1e-5), L.rms_norm_ref(x, w, 1e-5), **_close(dtype))
    h, normed = L.add_rms_norm(x, y, w, 1e-5)
    h_ref, normed_ref = L.add_rms_norm_ref(x, y, w, 1e-5)
    torch.testing.assert_close(h, h_ref, **_close(dtype))
    torch.testing.assert_close(normed, normed_ref, **_close(dtype))
    # a float32 weight over bfloat16 rows scales in float32, as torch promotes
    out = L.rms_norm(x, w.float(), 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, L.rms_norm_ref(x, w.float(), 1e-5), **_close(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,S,D", [(12, 1, 64), (40, 5, 128), (6, 3, 80)])
def test_rope_equals_its_reference(dtype, heads, S, D, rows_per_program):
    """Over q and k as the model hands them: a strided view of the fused projection's
    output ([S, heads + v heads, D] transposed), with the table's rows gathered by
    position; more heads than a program takes; a head dim whose half is no power of two."""
    g = torch.Generator().manual_seed(heads * S)
    qkv = _randn(g, S, heads + 2, D, dtype=dtype).transpose(0, 1)
    table_cos, table_sin = _randn(g, 64, D, dtype=dtype), _randn(g, 64, D, dtype=dtype)
    pos = torch.randperm(64, generator=g)[:S].to(DEVICE)
    cos, sin = table_cos.index_select(0, pos), table_sin.index_select(0, pos)
    out = L.rope(qkv[:heads], cos, sin)
    assert out.shape == (heads, S, D) and out.is_contiguous()
    ref = L.rope_ref(qkv[:heads], cos, sin)
    # (a sum of two rounded products may cancel: absolute, at the products' scale)
    torch.testing.assert_close(out, ref, rtol=_close(dtype)["rtol"], atol=4 * _close(dtype)["atol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,features", [(1, 1536), (4, 100), (2, 2048)])
def test_silu_mul_equals_its_reference(dtype, rows, features, rows_per_program):
    g = torch.Generator().manual_seed(rows * features)
    gu = _randn(g, rows, 2 * features, dtype=dtype, scale=3)
    out = L.silu_mul(gu)
    assert out.shape == (rows, features)
    # (relative to the largest value: the products reach ~60 with these inputs)
    atol = _close(dtype)["atol"] * float(out.float().abs().max())
    torch.testing.assert_close(out, L.silu_mul_ref(gu), rtol=_close(dtype)["rtol"], atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,S,D", [(9, 3, 1, 64), (32, 8, 1, 128), (12, 2, 5, 80)])
def test_rope_store_equals_rope_then_store(dtype, Hq, Hkv, S, D, rows_per_program):
    """RoPE of q and k with the store of k and v, in one launch, against the layer's RoPE
    and its writes (`store_kv_ref`, an `index_copy_` each): from a strided view of the fused projection's output into views of
    one buffer (the tiered step's ring after its sink), more heads than a program takes,
    a head dim whose half is no power of two, several positions."""
    g = torch.Generator().manual_seed(Hq * S + D)
    qkv = _randn(g, S, Hq + 2 * Hkv, D, dtype=dtype).transpose(0, 1)
    cos, sin = _randn(g, S, D, dtype=dtype), _randn(g, S, D, dtype=dtype)
    pos = torch.randperm(32, generator=g)[:S].to(DEVICE)
    want = _randn(g, 2, Hkv, 8 + 32, D, dtype=dtype)
    got = want.clone()
    q_ref = L.rope_store_ref(qkv, cos, sin, want[0, :, 8:], want[1, :, 8:], pos)
    q = L.rope_store(qkv, cos, sin, got[0, :, 8:], got[1, :, 8:], pos)
    close = dict(rtol=_close(dtype)["rtol"], atol=4 * _close(dtype)["atol"])  # (as RoPE's)
    torch.testing.assert_close(q, q_ref, **close)
    torch.testing.assert_close(got, want, **close)
    assert torch.equal(got[1], want[1])  # v: copied as it is
    untouched = torch.ones(Hkv, 8 + 32, dtype=torch.bool, device=DEVICE)
    untouched[:, 8 + pos] = False
    assert torch.equal(got[:, untouched], want[:, untouched])


def test_linear_add_sums_in_the_matmul_where_it_can():
    """r + linear(x) as one addmm for a plain linear; a biased one (and the int4/int8
    linears) as the two operations."""
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(5, 96, generator=g).to(DEVICE), torch.randn(5, 64, generator=g).to(DEVICE)
    plain = torch.nn.Linear(96, 64, bias=False).to(DEVICE)
    biased = torch.nn.Linear(96, 64).to(DEVICE)
    torch.testing.assert_close(L.linear_add(x, plain, r), L.linear_add_ref(x, plain, r))
    assert torch.equal(L.linear_add(x, biased, r), L.linear_add_ref(x, biased, r))


def test_the_backend_picks_the_kernels_where_it_runs_them():
    assert Backend(torch.device("cpu")).layer_ops is L.REFERENCE
    assert Backend(DEVICE, kernels=True).layer_ops is L.KERNELS
    # compiled, Inductor fuses torch's operations (across the residual sums too)
    assert Backend(DEVICE, kernels=True, compile=True).layer_ops is L.REFERENCE


def test_a_head_dim_the_kernels_do_not_take_runs_torchs_operations_on_cuda():
    """(No GPU needed: the backend is only chosen here.)"""
    assert Backend.for_device("cuda", head_dim=64).kernels
    assert not Backend.for_device("cpu", head_dim=64).kernels
    with pytest.warns(UserWarning, match="head_dim 80"):
        backend = Backend.for_device("cuda", head_dim=80)
    assert not backend.kernels and backend.graphs and backend.layer_ops is L.REFERENCE


def test_a_runtime_runs_its_backends_layer_ops(tiny_dirs):
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], device=DEVICE.type)
    block = rt.model.layers[0]
    for m in (block.attention_norm, block.ffn_norm, block.attention, block.feed_forward):
        assert m.ops is rt.backend.layer_ops
    assert rt.model.norm.ops is rt.backend.layer_ops


def test_the_model_with_the_kernels_equals_the_model_with_torch(tiny_dirs):
    """A prompt in chunks and greedy decoding, float32: the same tokens, logits within
    float32 rounding. (Each block uses every kernel: its two norms, the residual sum with
    the second, RoPE of q and k, SwiGLU, the last residual sum in the down projection.)"""
    rt = Runtime.from_pretrained(
        tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full", device=DEVICE.type
    )
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 4)
    runs = []
    for used in (L.REFERENCE, L.KERNELS):
        rt.model.use_ops(used)
        cache = rt.new_cache()
        logits = prefill(rt.model, cache, ids, 8)
        out, tokens = [logits], []
        for _ in range(6):
            tokens.append(int(logits.argmax()))
            logits = cache.decode(rt.model, tokens[-1])
            out.append(logits)
        runs.append((tokens, torch.stack(out)))
        cache.close()
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-4)
