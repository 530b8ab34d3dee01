"""A dense bf16 (or float16) model on a CPU without fast matmuls in it (AVX2 without
AVX-512), where torch emulates them (7-8x slower than float32 at 512 rows): prefill
chunks multiply the weights in float32 (offload/weight_forms.py, `HalfLinear`), decode
steps the weights as they are. Such a CPU is made here whatever this one is."""

import pytest
import torch
from torch import nn

from offload import Runtime, quantize
from offload.weight_forms import HALF_MAX_ROWS, HalfLinear


@pytest.fixture
def slow_half(monkeypatch):
    monkeypatch.setattr(quantize, "slow_bf16_matmul", lambda: True)
    monkeypatch.setattr(quantize, "slow_fp16_matmul", lambda: True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_linear_multiplies_a_chunks_rows_in_float32(slow_half, dtype):
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(64, 48, bias=True).to(dtype)
    linear = HalfLinear.of(dense)
    assert linear.weight is dense.weight and linear.bias is dense.bias
    w, b = dense.weight.detach(), dense.bias.detach()
    for rows in (1, HALF_MAX_ROWS, HALF_MAX_ROWS + 1, 300):
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        want = (
            nn.functional.linear(x, w, b)
            if rows <= HALF_MAX_ROWS
            else nn.functional.linear(x.float(), w.float(), b.float()).to(dtype)
        )
        assert torch.equal(linear(x), want), rows
    linear.keep = True  # (kept once made: the same product)
    x = torch.randn(40, 64, generator=gen).to(dtype)
    first = linear(x)
    assert linear.kept is not None and linear.kept.dtype == torch.float32
    assert torch.equal(linear(x), first)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama3-rope-tied"])
def test_a_dense_bf16_model_on_such_a_cpu_runs_its_linears_so(tiny_dirs, slow_half, name):
    """Its block linears and its head (tied: the embedding's own weight) become
    `HalfLinear`s when it loads, keeping its state dict; a greedy answer is the same
    whether the prefill's float32 weights were kept from an earlier prompt or not."""
    path = tiny_dirs[name][0]
    rt = Runtime.from_pretrained(path, dtype="bfloat16", device="cpu")
    model = rt.loaded.model
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears and set(linears.values()) == {HalfLinear}, linears
    if model.args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    plain = Runtime.from_pretrained(path, dtype="float32", device="cpu").loaded.model
    assert model.state_dict().keys() == plain.state_dict().keys()
    prompt = "seven stones " * 12  # (more than HALF_MAX_ROWS tokens)
    first = rt.generate(prompt, max_new_tokens=8)
    assert any(m.kept is not None for m in model.modules() if isinstance(m, HalfLinear))
    assert rt.generate(prompt, max_new_tokens=8) == first
    for m in model.modules():
        if isinstance(m, HalfLinear):
            m.keep, m.kept = False, None
    assert rt.generate(prompt, max_new_tokens=8) == first


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_chunks_attention_converts_to_float32_where_that_pays(slow_half, dtype):
    """A bf16 chunk of at most `BF16_CHUNK_ROWS` queries after earlier keys attends in
    bf16 (their keys and values converted cost more than float32 gains: a question on a
    loaded document); a prompt's first chunk, a longer chunk, and any float16 chunk
    attend in float32, as before."""
    from offload import attention as A

    g = torch.Generator().manual_seed(3)
    T = A.BF16_CHUNK_ROWS + 40
    k, v = (torch.randn(2, T, 16, generator=g).to(dtype) for _ in range(2))
    differs = 0
    for S, keys in ((8, T), (A.BF16_CHUNK_ROWS, T), (A.BF16_CHUNK_ROWS + 1, T), (40, 40)):
        q = torch.randn(6, S, 16, generator=g).to(dtype)
        kk, vv = k[:, :keys], v[:, :keys]
        in_float32 = A.gqa_attention(q.float(), kk.float(), vv.float()).to(dtype)
        as_is = dtype == torch.bfloat16 and S < keys and S <= A.BF16_CHUNK_ROWS
        want = A._cpu_chunk_attention(q, kk, vv) if as_is else in_float32
        got = A.gqa_attention(q, kk, vv)
        assert torch.equal(got, want), (S, keys)
        torch.testing.assert_close(got, in_float32, atol=3e-2, rtol=3e-2)
        differs += not torch.equal(got, in_float32)
    assert differs == (2 if dtype == torch.bfloat16 else 0)
