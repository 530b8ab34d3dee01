"""A dense bf16 model on a CPU without fast bf16 matmuls (AVX2 without AVX-512), where
torch emulates bf16 GEMMs (7-8x slower than float32 at 512 rows): prefill chunks
multiply the weights in float32 (offload/weight_forms.py, `Bf16Linear`), decode steps
the bf16 weights. Such a CPU is made here whatever this one is (`slow_bf16_matmul`)."""

import pytest
import torch
from torch import nn

from offload import Runtime, quantize, weight_forms
from offload.weight_forms import BF16_MAX_ROWS, Bf16Linear


@pytest.fixture
def slow_bf16(monkeypatch):
    monkeypatch.setattr(quantize, "slow_bf16_matmul", lambda: True)
    monkeypatch.setattr(weight_forms, "slow_bf16_matmul", lambda: True)


def test_a_bf16_linear_multiplies_a_chunks_rows_in_float32(slow_bf16):
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    linear = Bf16Linear.of(dense)
    assert linear.weight is dense.weight and linear.bias is dense.bias
    w, b = dense.weight.detach(), dense.bias.detach()
    for rows in (1, BF16_MAX_ROWS, BF16_MAX_ROWS + 1, 300):
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        want = (
            nn.functional.linear(x, w, b)
            if rows <= BF16_MAX_ROWS
            else nn.functional.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
        )
        assert torch.equal(linear(x), want), rows
    linear.keep = True  # (kept once made: the same product)
    x = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    first = linear(x)
    assert linear.kept is not None and linear.kept.dtype == torch.float32
    assert torch.equal(linear(x), first)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama3-rope-tied"])
def test_a_dense_bf16_model_on_such_a_cpu_runs_its_linears_so(tiny_dirs, slow_bf16, name):
    """Its block linears and its head (tied: the embedding's own weight) become
    `Bf16Linear`s when it loads, keeping its state dict; a greedy answer is the same
    whether the prefill's float32 weights were kept from an earlier prompt or not."""
    path = tiny_dirs[name][0]
    rt = Runtime.from_pretrained(path, dtype="bfloat16", device="cpu")
    model = rt.loaded.model
    linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears and set(linears.values()) == {Bf16Linear}, linears
    if model.args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    plain = Runtime.from_pretrained(path, dtype="float32", device="cpu").loaded.model
    assert model.state_dict().keys() == plain.state_dict().keys()
    prompt = "seven stones " * 12  # (more than BF16_MAX_ROWS tokens)
    first = rt.generate(prompt, max_new_tokens=8)
    assert any(m.kept is not None for m in model.modules() if isinstance(m, Bf16Linear))
    assert rt.generate(prompt, max_new_tokens=8) == first
    for m in model.modules():
        if isinstance(m, Bf16Linear):
            m.keep, m.kept = False, None
    assert rt.generate(prompt, max_new_tokens=8) == first
