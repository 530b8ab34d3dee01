"""Prefill into the tiered cache: layer by layer (all hidden states kept, one layer's KV
on the device at a time, handed over on a side stream) against token-chunked prefill,
the host slabs reserved once for a prompt, and the fixed-shape step's buffers after it
(offload/generate.py `prefill_by_layer`; the step itself: tests/test_tiered_step.py)."""

import pytest
import torch

from offload import Runtime
from offload.generate import prefill
from tests.conftest import DEVICE
from tests.test_decode_step import _greedy
from tests.test_tiered_step import _tiered_pair


@pytest.mark.parametrize("mirrored,weights", [(False, "dense"), (True, "dense"), (False, "int4")])
def test_prefill_by_layer_equals_chunked_prefill(tiny_dirs, mirrored, weights, monkeypatch):
    """Layer by layer (all hidden states kept, one layer's KV at a time) gives the logits
    and the KV of token-chunked prefill through the tiers, and the same decode after;
    the host slabs grow on the reserving thread, not in the appends. With int4 linears,
    a layer's weights dequantized once for all its chunks are the ones each chunk of a
    token-chunked prefill dequantizes."""
    from offload.generate import prefill_by_layer
    from tests.conftest import count_slab_growths

    # (a full budget: where the host tier is remote, CUDA's, a token-chunked prefill
    # attends sparsely to the tokens before its chunk; layer by layer, exactly)
    rt, plain, layered = _tiered_pair(tiny_dirs, retrieved=100_000, weights=weights)
    plain.layered_prefill = False  # (on CUDA the Runtime asks for layers)
    if not mirrored:
        layered = rt.new_cache()
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    want = prefill(rt.model, plain, ids, 64)
    plain.finish_prefill()
    seen = []
    real_read = layered.store.read_keys
    layered.store.read_keys = lambda *a: pytest.fail("keys read back from the host tier")
    grown = count_slab_growths(monkeypatch)
    got = prefill_by_layer(rt.model, layered, ids, 64, lambda *a: seen.append(a))
    monkeypatch.undo()
    assert grown and all(name.startswith("offload-reserve") for name in grown)
    layered.finish_prefill()  # each layer was indexed from its device keys already
    layered.store.read_keys = real_read
    whole = len(ids) // rt.config.kv.chunk_size * rt.config.kv.chunk_size
    for a, b in zip(plain.policy.selectors, layered.policy.selectors, strict=True):
        assert (a is None) == (b is None)
        if a is not None:  # layer by layer, every whole chunk is indexed; token-chunked
            # on CUDA, the index was built by the first piece that selected with it (the
            # tokens after it are the index's tail until the next refresh)
            assert b.indexed_tokens == whole
            assert a.indexed_tokens == whole or DEVICE.type == "cuda"
            if a.indexed_tokens == whole:
                assert a.segments == b.segments
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert seen[-1] == (150, 150, "prefill") and len(seen) == rt.args.num_layers
    assert layered.num_tokens == layered.store.num_tokens == 150
    for layer in range(rt.args.num_layers):
        k_p, v_p = plain.store.gather_all(layer)
        k_l, v_l = layered.store.gather_all(layer)
        torch.testing.assert_close(k_l, k_p)
        torch.testing.assert_close(v_l, v_p)
    # (on CUDA the Runtime's tiered caches mirror their dense layers always)
    assert (layered.layers[0].mirror is not None) == (mirrored or DEVICE.type == "cuda")
    assert _greedy(plain, rt.model, want, 12) == _greedy(layered, rt.model, got, 12)


@pytest.mark.parametrize("host_chunks", [None, 16])
def test_each_layer_is_handed_over_on_a_side_stream_while_the_next_computes(
    tmp_path, monkeypatch, host_chunks
):
    """On CUDA (emulated on a CPU, where the race check sees the streams' order), a
    layer-by-layer prefill hands layer i to the store (copies, summaries, index) on a
    side stream after layer i + 1's compute is queued, in two layer buffers that take
    turns (four layers: each buffer is reused after a dense layer's hand-over and after
    a sparse one's); the logits and the answer are the CPU dense cache's. With a host
    budget of 16 chunks for 50, the hand-overs spill the earlier layers to disk."""
    import offload.generate as generate
    from tests.conftest import make_tiny_hf_model, on_cuda

    make_tiny_hf_model(tmp_path, "llama-gqa-untied", layers=4)
    ids = list(range(3, 203))
    full = Runtime.from_pretrained(tmp_path, dtype="float32", mode="full", device="cpu")
    dense = full.new_cache()
    want = prefill(full.model, dense, ids, 64)
    with on_cuda():
        rt = Runtime.from_pretrained(tmp_path, dtype="float32", device="cuda", mode="sparse",
                                     sink=4, window=16, dense_layers=2, retrieved=100_000,
                                     candidate_factor=2)  # fmt: skip
        if host_chunks:
            cfg = rt.config.replace(host_bytes=host_chunks * rt.layout.chunk_bytes, spill_batch=4)
            rt = Runtime(rt.loaded, cfg, rt.device)
        cache = rt.new_cache()
        assert cache.layered_prefill
        main = torch.cuda.current_stream()
        seen, made = [], []
        for i, block in enumerate(rt.model.layers):
            real = block.forward
            monkeypatch.setattr(block, "forward",
                                lambda *a, i=i, real=real: seen.append(("compute", i)) or real(*a))  # fmt: skip
        real_append = type(cache.layers[0]).append

        def append(layer, k, v):
            assert torch.cuda.current_stream() != main  # (CUDA: a new object per call)
            seen.append(("hand over", layer.layer))
            real_append(layer, k, v)

        monkeypatch.setattr(type(cache.layers[0]), "append", append)
        buffer = generate.DenseLayer
        monkeypatch.setattr(generate, "DenseLayer", lambda *a: made.append(1) or buffer(*a))
        got = prefill(rt.model, cache, ids, 64)
        monkeypatch.undo()
        order = [e for i, e in enumerate(seen) if e != seen[i - 1]]  # (a compute per chunk)
        assert order == [("compute", 0), ("compute", 1), ("hand over", 0), ("compute", 2),
                         ("hand over", 1), ("compute", 3), ("hand over", 2), ("hand over", 3)]  # fmt: skip
        assert len(made) == 2
        times = generate.layer_times(cache)  # (the main stream's events around each layer)
        assert len(cache.prefill_timeline) == 4 and times["layers_ms"] > 0
        assert times["between_layers_ms"] >= 0
        assert all(cache.policy.indexed[i] for i in (2, 3))
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
        cache.finish_prefill()
        assert (cache.store.spilled_chunks > 0) == bool(host_chunks)
        assert _greedy(cache, rt.model, got, 8) == _greedy(dense, full.model, want, 8)


def test_a_prompt_of_many_chunks_reserves_each_layers_slab_once(tiny_dirs, monkeypatch):
    """Token-chunked prefill into the tiers (a long prompt after earlier context) has a
    thread size each layer's host slab for the whole prompt, instead of growing it chunk
    by chunk; a prompt of one chunk does not. The KV is as without it."""
    from storage.tiered import TieredStore

    rt, plain, _ = _tiered_pair(tiny_dirs)
    plain.layered_prefill = False
    asked, real = [], TieredStore.reserve_host
    monkeypatch.setattr(TieredStore, "reserve_host",
                        lambda self, layer, n: asked.append((layer, n)) or real(self, layer, n))  # fmt: skip
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    prefill(rt.model, plain, ids[:100], 64)  # two chunks
    assert sorted(asked) == [(i, 100) for i in range(rt.args.num_layers)]
    prefill(rt.model, plain, ids[100:140], 64)  # one chunk: nothing to reserve
    assert len(asked) == rt.args.num_layers
    store = plain.store
    for layer in range(rt.args.num_layers):
        assert store.host[layer].slab.shape[2] >= store.layout.num_chunks(100)
        assert store.read_range(layer, 0, 140).shape[2] == 140


def test_after_a_layer_by_layer_prefill_the_steps_buffers_keep_their_addresses(tiny_dirs):
    """A layer-by-layer prefill sizes the summaries, the device index and the dense
    mirrors exactly; the first step makes their room, so the steps after it keep every
    address (on CUDA: one capture, replayed) past the first flush and the device index's
    first growth, which each moved a buffer before."""
    from offload.generate import prefill_by_layer

    rt, _, stepped = _tiered_pair(tiny_dirs, retrieved=100_000)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:150]
    token = int(prefill_by_layer(rt.model, stepped, ids, 64).argmax())
    stepped.finish_prefill()
    plan, keys = stepped.step.plan, []
    real = plan.prepare
    plan.prepare = lambda n: keys.append(real(n)) or keys[-1]
    for _ in range(18):  # (the mirrors, grown by an eighth at the first step, hold 168)
        token = int(stepped.decode(rt.model, token).argmax())
    assert plan.steps == 18 and len(set(keys)) == 1
