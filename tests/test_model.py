"""Numerics: our model against transformers on tiny seeded checkpoints (fp32)."""

import os
from pathlib import Path

import pytest
import torch

from offload import Runtime
from offload.kvcache import KVCache
from tests.conftest import TINY_CONFIGS, logits_tolerance


@pytest.fixture(scope="module")
def runtimes(tiny_dirs):
    """On the CPU on every machine: they are compared with transformers there, and their
    stats are a CPU's (mode "auto" keeps the KV in the dense cache within the host budget)."""
    return {
        name: Runtime.from_pretrained(directory, dtype="float32", device="cpu")
        for name, (directory, _) in tiny_dirs.items()
    }


def random_ids(n, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, tiny_dirs, runtimes):
    _, ref_model = tiny_dirs[name]
    ids = random_ids(90)  # past the llama3 config's original 32 positions
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    ours = runtimes[name].logits(ids)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ref.abs().max() > 0.5, "reference logits are too small to make a meaningful test"
    torch.testing.assert_close(ours, ref, **logits_tolerance(name))


def test_args_from_config(runtimes):
    a = runtimes["llama3-rope-tied"].args
    assert a.rope_scaling is not None and a.rope_scaling.factor == 8.0
    assert a.tie_embeddings and a.num_kv_heads == 1
    assert runtimes["qwen2-bias"].args.qkv_bias
    assert not runtimes["llama-gqa-untied"].args.qkv_bias


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias"])
def test_chunked_prefill_equals_one_shot(name, runtimes):
    rt = runtimes[name]
    ids = random_ids(100, seed=1)
    one_shot = rt.logits(ids)
    model, a = rt.model, rt.args
    for chunk in (1, 7, 33):
        cache = KVCache.dense(a.num_layers, a.num_kv_heads, a.head_dim, torch.float32, "cpu")
        parts = [model(ids[s : s + chunk], cache) for s in range(0, len(ids), chunk)]
        torch.testing.assert_close(torch.cat(parts), one_shot, atol=1e-4, rtol=1e-4)
        assert cache.num_tokens == len(ids)


def test_incremental_decode_equals_full_forward(runtimes):
    rt = runtimes["llama3-rope-tied"]
    ids = random_ids(60, seed=2)
    full = rt.logits(ids)
    a = rt.args
    cache = KVCache.dense(a.num_layers, a.num_kv_heads, a.head_dim, torch.float32, "cpu")
    rt.model(ids[:40], cache)
    steps = [rt.model(ids[i : i + 1], cache) for i in range(40, 60)]
    torch.testing.assert_close(torch.cat(steps), full[40:], atol=1e-4, rtol=1e-4)


def test_truncate_then_continue_equals_fresh(runtimes):
    rt = runtimes["qwen2-bias"]
    ids = random_ids(50, seed=3)
    other = random_ids(20, seed=4)
    a = rt.args
    cache = KVCache.dense(a.num_layers, a.num_kv_heads, a.head_dim, torch.float32, "cpu")
    rt.model(torch.cat([ids[:30], other]), cache)
    cache.truncate(30)
    cont = rt.model(ids[30:], cache)
    torch.testing.assert_close(cont, rt.logits(ids)[30:], atol=1e-4, rtol=1e-4)


def test_generation_on_tiny_model_is_deterministic(runtimes):
    rt = runtimes["llama-gqa-untied"]
    a = rt.generate("seven quiet stones", max_new_tokens=12)
    b = rt.generate("seven quiet stones", max_new_tokens=12)
    assert a == b
    s = rt.stats()
    assert s["decode_tokens"] >= 1 and s["context_tokens"] > 0
    # The second call shares the whole prompt, which the first computed in one pass:
    # that pass is computed again as it was (exact reuse), not its last token alone.
    assert s["prefill_tokens"] == s["prompt_tokens"] and s["reused_tokens"] == 0
    # default mode "auto" on a CPU: the dense cache, the KV within the host budget
    assert rt._state.cache.store is None
    assert s["kv_bytes"] == {"device": s["context_tokens"] * rt.layout.token_bytes}


def test_tiered_dense_chat_equals_in_memory_chat(tiny_dirs, tmp_path):
    directory, _ = tiny_dirs["qwen2-bias"]
    full = Runtime.from_pretrained(directory, dtype="float32")
    chunk_bytes = full.layout.chunk_bytes
    tiered = Runtime(
        full.loaded,
        full.config.replace(
            mode="dense", host_bytes=5 * chunk_bytes, disk_dir=str(tmp_path), spill_batch=2
        ),
        full.device,
    )
    turns = ["seven quiet stones " * 6, "the river", "green market north " * 4]
    a, b = full.chat(), tiered.chat()
    for text in turns:
        assert a.send(text, max_new_tokens=9) == b.send(text, max_new_tokens=9)
        assert full.stats()["prefill_tokens"] == tiered.stats()["prefill_tokens"]
    assert tiered.stats()["spilled_chunks"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,T", [(1, 40), (7, 7), (7, 40), (33, 100)])
def test_gqa_attention_equals_causal_softmax(dtype, S, T):
    """Decode, a first chunk, and chunks after earlier tokens (on the CPU: the prefix and
    the chunk attended apart and merged) all equal a plain lower-right causal softmax."""
    from offload.attention import gqa_attention

    g = torch.Generator().manual_seed(S * T)
    q, k, v = (torch.randn(h, n, 16, generator=g) for h, n in ((6, S), (2, T), (2, T)))
    k_rep, v_rep = k.repeat_interleave(3, 0), v.repeat_interleave(3, 0)
    logits = q @ k_rep.transpose(1, 2) / 4.0
    visible = torch.arange(T)[None, :] <= torch.arange(T - S, T)[:, None]
    want = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ v_rep
    got = gqa_attention(q.to(dtype), k.to(dtype), v.to(dtype)).float()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_split_into_ranges_of_keys_equals_the_whole(dtype, monkeypatch):
    """On the CPU a long decode attention runs as ranges of keys merged by their
    log-sum-exps, so that every thread has work (3 KV heads on 2 threads: two ranges),
    the keys left over by an uneven split a range of their own."""
    import offload.attention as A

    assert A.decode_parts(3, 2 * A.SPLIT_KEYS - 1) == 1  # (too short to be worth it)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert A.decode_parts(3, 2 * A.SPLIT_KEYS) == 2 and A.decode_parts(8, 10**6) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert A.decode_parts(3, 3 * A.SPLIT_KEYS) == 3 and A.decode_parts(3, 10**6) == 8
    assert A.decode_parts(8, 10**6) == 1 and A.decode_parts(12, 10**6) == 2
    g = torch.Generator().manual_seed(5)
    for T, parts in ((40, 2), (41, 2), (41, 3), (43, 4)):
        q, k, v = (torch.randn(h, n, 16, generator=g) for h, n in ((6, 1), (2, T), (2, T)))
        want = torch.softmax(q @ k.repeat_interleave(3, 0).transpose(1, 2) / 4.0, -1)
        want = want @ v.repeat_interleave(3, 0)
        got = A._split_decode_attention(q.to(dtype), k.to(dtype), v.to(dtype), parts).float()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # and `gqa_attention` takes that path where the split pays
    monkeypatch.setattr(A, "decode_parts", lambda heads, keys: 3)
    q, k, v = (torch.randn(h, n, 16, generator=g) for h, n in ((6, 1), (2, 50), (2, 50)))
    split = A._split_decode_attention(q, k, v, 3)
    assert torch.equal(A.gqa_attention(q, k, v), split)
    monkeypatch.setattr(A, "decode_parts", lambda heads, keys: 1)
    assert not torch.equal(A.gqa_attention(q, k, v), split)  # (rounded otherwise)


def test_weight_cache_keeps_one_entry_per_model_dtype_and_form(tmp_path, monkeypatch):
    from offload.loading import load
    from tests.gguf_files import write_gguf

    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "weights"
    src = write_gguf(tmp_path / "m.gguf")
    cpu = torch.device("cpu")
    legacy = folder / f"m-{'0' * 24}.safetensors"  # named before slots: never read again
    folder.mkdir(parents=True)
    legacy.write_bytes(b"old")
    load(src, torch.float32, cpu, "auto")
    (f32,) = folder.glob("*.safetensors")
    assert not legacy.exists()
    load(src, torch.bfloat16, cpu, "auto")  # another dtype: its own slot, both kept
    assert len(list(folder.glob("*.safetensors"))) == 2
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a reinstalled model file
    load(src, torch.float32, cpu, "auto")
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(names) == 2 and f32.name not in names


def test_weight_cache_leaves_no_partial_file(tmp_path, monkeypatch):
    """A conversion interrupted by Ctrl-C removes its partial file; one whose process was
    killed (its name says which) is removed by the next write, others' are left."""
    import safetensors.torch

    from offload.loading import load
    from tests.gguf_files import write_gguf

    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "weights"
    folder.mkdir(parents=True)
    src = write_gguf(tmp_path / "m.gguf")
    real = safetensors.torch.save_file

    def interrupted(state, name, metadata=None):
        Path(name).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(src, torch.float32, torch.device("cpu"), "auto")
    assert list(folder.iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    killed = folder / ".m-0-0.safetensors.999999999-0123abcd.tmp"  # no such process
    alive = folder / f".m-0-0.safetensors.{os.getppid()}-0123abcd.tmp"  # a writer still at it
    for f in (killed, alive):
        f.write_bytes(b"partial")
    load(src, torch.float32, torch.device("cpu"), "auto")
    assert not killed.exists() and alive.exists()
    assert len(list(folder.glob("*.safetensors"))) == 1


def test_weight_cache_checksums_are_the_same_on_threads(monkeypatch):
    """A large cache file's tensors are checked on threads: the same crc32s, bf16 included."""
    from offload import weight_cache

    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(300 + i, generator=g).to(dt)
             for i, dt in enumerate((torch.float32, torch.bfloat16, torch.float16) * 3)}  # fmt: skip
    state["codes"] = torch.randint(0, 1 << 30, (7, 5), generator=g, dtype=torch.int32)
    one = weight_cache._crc32s(state)
    monkeypatch.setattr(weight_cache, "THREADED_CRC_BYTES", 0)
    assert weight_cache._crc32s(state) == one and len(set(one.values())) == len(state)


def test_converted_gguf_is_cached_and_loads_the_same(tmp_path, monkeypatch):
    import offload.gguf
    from offload import weight_cache
    from offload.loading import load
    from tests.gguf_files import write_gguf

    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    src = write_gguf(tmp_path / "m.gguf")
    cpu = torch.device("cpu")
    first = load(src, torch.float32, cpu, "auto")
    files = list((tmp_path / "cache" / "weights").glob("*.safetensors"))
    assert len(files) == 1
    ids = torch.tensor([3, 1, 4, 1, 5])

    def logits(loaded):
        from offload.kvcache import KVCache

        a = loaded.args
        cache = KVCache.dense(a.num_layers, a.num_kv_heads, a.head_dim, torch.float32, cpu)
        return loaded.model(ids, cache)

    monkeypatch.setattr(offload.gguf, "open_gguf", lambda p: pytest.fail("the cache was not used"))
    again = load(src, torch.float32, cpu, "auto")
    assert again.fingerprint == first.fingerprint
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert torch.equal(logits(again), logits(first))
    monkeypatch.undo()
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    # a damaged cache file is converted again and replaced; an unwritable folder only costs time
    raw = bytearray(files[0].read_bytes())
    raw[-5] ^= 0x10  # (in the last tensor's data: the file still reads)
    files[0].write_bytes(bytes(raw))
    assert weight_cache.load_cached(files[0], torch.float32, cpu, "auto") is None
    assert torch.equal(logits(load(src, torch.float32, cpu, "auto")), logits(first))
    assert weight_cache.load_cached(files[0], torch.float32, cpu, "auto") is not None
    files[0].write_bytes(files[0].read_bytes()[:1000])
    assert torch.equal(logits(load(src, torch.float32, cpu, "auto")), logits(first))
    assert weight_cache.load_cached(files[0], torch.float32, cpu, "auto") is not None
    (tmp_path / "ro").write_text("a file where a folder should be")
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "ro"))
    assert torch.equal(logits(load(src, torch.float32, cpu, "auto")), logits(first))
