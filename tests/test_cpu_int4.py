"""Packed weights on the CPU as a user's files give them (offload/quantize.py,
offload/loading.py): a GGUF stored at 4 bits or fewer runs at int4 by default (K-quants
too, Q4_0/Q4_1/Q4_K with their own codes), one of 5 to 8 bits at int8, and a model
loaded at int4 on the CPU has each block linear put into the form as it is read
(`Int4Packer`: the dense model is never whole), then cached in that form."""

import shutil

import pytest
import torch

from offload import Runtime, quantize
from offload.loading import load, read_model_info
from tests.gguf_files import write_gguf

CPU = torch.device("cpu")


def _quantized_as_read(monkeypatch) -> list[tuple]:
    """The shapes `int4_codes` is given from now on (the packer's, once a linear as it is
    read; `quantize_model` after the load would take the fused ones)."""
    seen, real = [], quantize.int4_codes
    monkeypatch.setattr(quantize, "int4_codes", lambda w, *a: seen.append(tuple(w.shape)) or real(w, *a))  # fmt: skip
    return seen


def _int4_linears(model) -> dict[str, quantize.Int4Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, quantize.Int4Linear)}


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_a_gguf_of_4_bits_or_fewer_runs_at_int4_on_the_cpu(tmp_path, monkeypatch, kind):
    """`auto` on the CPU: a GGUF whose block linears are at 4 bits (Q4_0, Q4_1, Q4_K, the
    common Q4_K_M's type) runs them at int4 with the file's own codes, read from its
    blocks as each linear is read (seven linears; nothing quantized, nor again after
    the fusing). The weights are the file's (Q4_K's up to the float16
    rounding of its scales' products), the head is at int8, and a decode gives the
    tokens of the dense model whose weights are the dequantized codes. The next start
    maps the cached form. `offload info` says what the file holds and what it will run."""
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "m.gguf", dim=256, ff=512, quant=kind)
    assert read_model_info(src)["linears stored as"] == f"{kind} (auto on the CPU: int4)"
    seen, put = _quantized_as_read(monkeypatch), []
    real_put = quantize.Int4Packer.put
    monkeypatch.setattr(quantize.Int4Packer, "put",
                        lambda self, name, rows: put.append(tuple(rows.shape[:2])) or real_put(self, name, rows))  # fmt: skip
    loaded = load(src, torch.float32, CPU, "auto")
    model = loaded.model
    assert not seen  # (no weight quantized: the file's codes)
    assert model.weights == "int4" and loaded.fingerprint.endswith("+int4")
    assert model.source_quant == kind
    assert sorted(put) == sorted([(256, 8), (128, 8), (128, 8), (256, 8),
                                  (512, 8), (512, 8), (256, 16)])  # fmt: skip
    linears = _int4_linears(model)
    assert sorted(linears) == ["layers.0.attention.wo", "layers.0.attention.wqkv",
                               "layers.0.feed_forward.w13", "layers.0.feed_forward.w2"]  # fmt: skip
    assert all(m.cpu_kernel and m.packed.dtype == torch.uint8 for m in linears.values())
    assert isinstance(model.output, quantize.Int8Linear)
    twin = Runtime.from_pretrained(src, dtype="float32", device="cpu", weights="dense")
    dense = twin.loaded.model
    for name, m in linears.items():
        w, file = m.dequantized(torch.float32), dense.get_submodule(name).weight.detach()
        if kind == "Q4_K":  # (15 times a scale's rounding, and a minimum's)
            rounding = (15 * m.group_scale.float().abs() + m.group_min.float().abs()) / 2**11
            assert torch.all((w - file).abs() <= rounding.repeat_interleave(32, dim=1))
        else:
            assert torch.equal(w, file)
        dense.get_submodule(name).weight.data = w
    dense.output = model.output  # (the int8 head in both)
    seen.clear(), put.clear()
    quantize.packed_block.cache_clear()  # (as in a new process)
    rt = Runtime.from_pretrained(src, dtype="float32", device="cpu")
    assert not seen and not put and rt.loaded.model.weights == "int4"  # (the cache's, mapped)
    made, read = model.state_dict(), rt.loaded.model.state_dict()
    assert made.keys() == read.keys() and all(torch.equal(made[k], read[k]) for k in made)
    prompt = "abc def ghi"
    got = [s.token_id for s in rt.stream(prompt, 8, temperature=0.0)]
    assert got == [s.token_id for s in twin.stream(prompt, 8, temperature=0.0)]


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0"])
def test_a_gguf_of_5_to_8_bits_runs_at_int8_on_the_cpu(tmp_path, monkeypatch, kind):
    """`auto` on the CPU: Q5/Q6/Q8 block linears run at int8 per output channel (half the
    bytes of bf16), within half a step of the file's weights; the head is at int8 too.
    A file of float weights stays dense. `offload info` says which."""
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "m.gguf", dim=64, ff=96, quant=kind)
    assert read_model_info(src)["linears stored as"] == f"{kind} (auto on the CPU: int8)"
    loaded = load(src, torch.float32, CPU, "auto")
    model = loaded.model
    assert model.weights == "int8" and loaded.fingerprint.endswith("+int8")
    dense = load(src, torch.float32, CPU, "dense").model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, quantize.Int8Linear)}
    assert sorted(linears) == ["layers.0.attention.wo", "layers.0.attention.wqkv",
                               "layers.0.feed_forward.w13", "layers.0.feed_forward.w2",
                               "output"]  # fmt: skip
    for name, m in linears.items():
        w, file = m.qweight.float() * m.scale[:, None], dense.get_submodule(name).weight
        assert torch.all((w - file).abs() <= m.scale[:, None] * 0.501)
    floats = write_gguf(tmp_path / "f.gguf", dim=64, ff=96)
    assert read_model_info(floats)["linears stored as"] == "F32 (auto on the CPU: dense)"
    assert load(floats, torch.float32, CPU, "auto").model.weights == "dense"


def test_an_hf_directory_at_int4_on_the_cpu_is_packed_as_read_and_cached(
    tiny_dirs, tmp_path, monkeypatch
):
    """`model.weights = "int4"` on the CPU for a safetensors directory: each block linear
    quantized as it is read, pieces of a fused one the CPU kernel cannot take (outputs
    not in sixteens) at int8 as before; the next start reads the cache, not the shards."""
    import offload.weights

    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    shutil.copytree(tiny_dirs["qwen2-bias"][0], src)
    seen = _quantized_as_read(monkeypatch)
    first = load(src, torch.float32, CPU, "int4")
    assert first.model.weights == "int4" and seen
    assert len(seen) == 7 * first.args.num_layers  # (one each, as read)
    assert _int4_linears(first.model)
    kinds = {type(m).__name__ for m in first.model.layers[0].modules()}
    assert "Linear" not in kinds  # (every block linear at int4, or int8 where it must)
    seen.clear()
    monkeypatch.setattr(offload.weights, "load_hf_model", lambda *a: pytest.fail("shards read"))
    again = load(src, torch.float32, CPU, "int4")
    assert not seen and again.fingerprint == first.fingerprint
    made, read = first.model.state_dict(), again.model.state_dict()
    assert made.keys() == read.keys() and all(torch.equal(made[k], read[k]) for k in made)
    assert not list((tmp_path / "cache" / "weights").glob("*.partial*"))


def test_linears_the_cpu_kernel_cannot_take_are_at_int8(tmp_path, monkeypatch):
    """Packed as read, a fused linear whose outputs are not in sixteens (gate and up: 2 x
    36) goes to int8 after the fusing, from its codes; one whose inputs are not in 32s
    (down) is read dense and goes to int8 as before. The cached form is the same."""
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "m.gguf", dim=32, ff=36, quant="Q4_1")
    rt = Runtime.from_pretrained(src, dtype="float32", device="cpu")
    ff, attn = rt.loaded.model.layers[0].feed_forward, rt.loaded.model.layers[0].attention
    assert isinstance(attn.wqkv, quantize.Int4Linear) and attn.wqkv.cpu_kernel
    assert isinstance(ff.w13, quantize.Int8Linear) and isinstance(ff.w2, quantize.Int8Linear)
    dense = Runtime.from_pretrained(src, dtype="float32", device="cpu", weights="dense")
    file = dense.loaded.model.layers[0].feed_forward.w13.weight
    w = ff.w13.qweight.float() * ff.w13.scale[:, None]
    assert torch.all((w - file).abs() <= ff.w13.scale[:, None] / 2 + file.abs().amax() / 15)
    again = Runtime.from_pretrained(src, dtype="float32", device="cpu")
    made, read = rt.loaded.model.state_dict(), again.loaded.model.state_dict()
    assert made.keys() == read.keys() and all(torch.equal(made[k], read[k]) for k in made)
    want = [s.token_id for s in rt.stream("abc", 6, temperature=0.0)]
    assert [s.token_id for s in again.stream("abc", 6, temperature=0.0)] == want


def test_a_gguf_is_taken_as_the_type_of_most_of_its_block_linears():
    """Q4_K_M keeps attn_v and ffn_down of some layers at Q6_K, and llama.cpp stores rows
    that are not whole 256-blocks in another type: `auto` follows the type that holds most
    of the block linears' weights (norms and the embedding do not count)."""
    from types import SimpleNamespace

    from offload.gguf import stored_as

    def reader(*tensors):
        return SimpleNamespace(tensors=[
            SimpleNamespace(name=n, tensor_type=SimpleNamespace(name=k), n_elements=e)
            for n, k, e in tensors
        ])  # fmt: skip

    q4_k_m = [(f"blk.{i}.{n}.weight", k, 4096 * e) for i in range(2)
              for n, k, e in (("attn_q", "Q4_K", 4096), ("attn_k", "Q4_K", 1024),
                              ("attn_v", "Q6_K", 1024), ("attn_output", "Q4_K", 4096),
                              ("ffn_gate", "Q4_K", 14336), ("ffn_up", "Q4_K", 14336),
                              ("ffn_down", "Q6_K" if i == 0 else "Q4_K", 14336))]  # fmt: skip
    embedding = [
        ("token_embd.weight", "Q6_K", 4096 * 128256),
        ("blk.0.attn_norm.weight", "F32", 4096),
    ]
    assert stored_as(reader(*q4_k_m, *embedding)) == "Q4_K"
    assert (
        stored_as(reader(("blk.0.attn_q.weight", "Q5_0", 10), ("blk.0.ffn_up.weight", "Q4_K", 30)))
        == "Q4_K"
    )
    assert stored_as(reader(*embedding)) is None


def test_the_load_memory_probe_converts_then_maps(tmp_path):
    """scripts/probe_load_memory.py (docs/performance.md's table) at a small size: a
    Q4_0 file loads at int4 in a fresh process, converting, then from the cache."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "probe.json"
    cmd = [sys.executable, "scripts/probe_load_memory.py", "--layers", "1", "--dim", "256",
           "--ff", "512", "--weights", "auto", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["start"], r["form"]) for r in rows] == [("first (converts)", "int4"),
                                                      ("second (the cache)", "int4")]  # fmt: skip
    assert all(r["peak_rss_gib"] > 0 and r["seconds"] > 0 for r in rows)


@pytest.mark.parametrize("n", [16, 48, 64, 96, 208])
def test_the_cpu_kernels_packed_codes_are_read_back(n):
    """torch's packed CPU form (blocks of 64 rows, then the rest in pairs) read back to
    the codes it was made of, so the CPU's int4 linears keep them once: a linear holds
    the packed copy, its scales and minimums, and dequantizes from them."""
    g = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n, 96), generator=g)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    assert quantize.packed_layout_known()
    assert torch.equal(quantize.codes_of_packed(packed, n, 96), q.to(torch.uint8))
    linear = torch.nn.Linear(96, n, bias=False)
    packed_linear = quantize.Int4Linear(linear)
    held = {name for name, _ in packed_linear.named_buffers()}
    assert held == {"packed", "scales_zeros", "group_scale", "group_min"}
    q, scale, lo = quantize.int4_codes(linear.weight)
    want = quantize.int4_kernels.dequantize_codes(q, scale.half(), lo.half())
    assert torch.equal(packed_linear.dequantized(torch.float32), want)


def test_prefill_keeps_the_dequantized_weights_within_a_budget(tmp_path, monkeypatch):
    """A prompt of more than `INT4_MAX_ROWS` tokens multiplies the dequantized weights;
    on the CPU they are kept (made by the first such prompt, in layer order within
    `KEPT_DENSE_BYTES`), so later ones do not dequantize them again: the same logits,
    bit for bit, as a runtime that keeps none; shorter prompts make none (bf16: float32
    rows always take the dequantized weights, below)."""
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "m.gguf", dim=256, ff=512, quant="Q4_1")
    rt = Runtime.from_pretrained(src, dtype="bfloat16", device="cpu")
    size = quantize.chunk_dtype(torch.empty(0, dtype=torch.bfloat16)).itemsize
    linears = [*_int4_linears(rt.loaded.model).values(), rt.loaded.model.output]
    assert all(m.keep and m.kept is None for m in linears)  # (all within the budget)
    made, real = [], quantize.Int4Linear._dequantize
    monkeypatch.setattr(quantize.Int4Linear, "_dequantize",
                        lambda self, dt: made.append(self) or real(self, dt))  # fmt: skip
    rt.logits([i % 97 for i in range(quantize.INT4_MAX_ROWS)])
    assert not made  # (the kernel's rows)
    ids = [i * 7 % 97 for i in range(100)]
    first = rt.logits(ids)
    assert len(made) == 4 and all(m.kept is not None for m in linears)
    assert torch.equal(rt.logits(ids), first) and len(made) == 4  # (kept: none made again)
    quantize.keep_dense(rt.loaded.model, budget=0)  # (a runtime that keeps none)
    for m in linears:
        m.kept = None
    assert torch.equal(rt.logits(ids), first) and len(made) == 8
    assert all(m.kept is None for m in linears)
    first_two = sum(m.out_features * m.in_features * size for m in linears[:2])
    quantize.keep_dense(rt.loaded.model, budget=first_two)
    assert [m.keep for m in linears] == [True, True, False, False, False]
