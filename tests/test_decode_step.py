"""The fixed-shape decode step over the device cache, and its decode-attention kernel.

Every test runs on the CPU (the kernel in Triton's interpreter, the step eagerly);
the CUDA-only ones check what only a GPU has: graph replay and no host sync.
"""

import threading

import pytest
import torch

from offload import Runtime
from offload.backend import Backend
from offload.generate import prefill
from offload.kernels import decode_attention as attention_kernels
from offload.kernels.decode_attention import decode_attention, decode_attention_ref, split_rows
from tests.conftest import DEVICE, cuda_only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "H,G,D,N,length",
    [
        (3, 3, 64, 300, 257),
        (2, 4, 128, 1000, 1),
        (1, 1, 16, 64, 64),
        (2, 2, 32, 9000, 8193),
        (2, 24, 32, 200, 150),
    ],
)
@pytest.mark.parametrize("splits", ["as on a GPU", "as interpreted"])
def test_decode_attention_kernel_matches_reference(dtype, H, G, D, N, length, splits, monkeypatch):
    """(With the GPU's splits, many of a few rows, most past the length, merged a query
    row a program, and with the interpreter's few of many rows, merged a head a program.)"""
    if splits == "as on a GPU":
        for name in ("BLOCK_N", "MAX_SPLITS", "COMBINE_ROWS"):
            monkeypatch.setattr(
                attention_kernels, "INTERPRETED_" + name, getattr(attention_kernels, name)
            )
    gen = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(H, n, D, generator=gen).to(DEVICE, dtype) for n in (G, N, N))
    k[:, length:] = 1e4  # rows past the length must not count, whatever they hold
    v[:, length:] = float("nan")
    n = torch.tensor([length], device=DEVICE)
    out = decode_attention(q, k, v, n)
    ref = decode_attention_ref(q, k, v, n)
    assert out.shape == (H, G, D) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_decode_attention_reads_strided_buffers():
    """The cache's buffers are views with capacity beyond the length; q may be a view."""
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(2, 2, 512, 64, generator=gen).to(DEVICE)
    q = torch.randn(2, 6, 64, generator=gen).to(DEVICE)[:, ::2]  # non-contiguous heads
    n = torch.tensor([100], device=DEVICE)
    k, v = kv[0, :, :300], kv[1, :, :300]
    torch.testing.assert_close(decode_attention(q, k, v, n), decode_attention_ref(q, k, v, n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("indexed", [False, True], ids=["rows", "rows by number"])
def test_decode_attention_over_a_second_set_of_rows(dtype, indexed):
    """The tiered step's attention: its sink and window buffer, and the selected tokens
    (gathered, or where they lie in its hit cache: row j of head h at idx2[h, j]); only
    the first `length` and `length2` of each count. More first rows than second ones,
    neither a multiple of a split."""
    gen = torch.Generator().manual_seed(7)
    H, G, D, N1, N2, slots = 2, 4, 64, 300, 40, 90
    q = torch.randn(H, G, D, generator=gen).to(DEVICE, dtype)
    first = torch.randn(2, H, N1, D, generator=gen).to(DEVICE, dtype)
    first[:, :, 272:] = float("nan")  # past the first length
    second = torch.randn(2, H, slots if indexed else N2, D, generator=gen).to(DEVICE, dtype)
    idx = torch.randint(0, slots, (H, N2), generator=gen).to(DEVICE) if indexed else None
    if not indexed:
        second[:, :, 33:] = float("nan")  # past the second length
    n1, n2 = (torch.tensor([n], device=DEVICE) for n in (272, 33))
    out = decode_attention(q, first[0], first[1], n1, second[0], second[1], n2, idx)
    heads = torch.arange(H, device=DEVICE)[:, None]
    picked = second[:, heads, idx] if indexed else second
    rows = torch.cat([first[:, :, :272], picked[:, :, :33]], dim=2)
    ref = decode_attention_ref(q, rows[0], rows[1], 272 + 33)
    torch.testing.assert_close(
        decode_attention_ref(q, first[0], first[1], n1, second[0], second[1], n2, idx), ref
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("N2", [40, 9000])
def test_decode_attention_leaves_out_rows_numbered_below_zero(N2):
    """A step that reuses its last selection marks the rows it does not use -1: the
    kernel and the reference leave them out. With 9,000 second rows a split holds
    several blocks, and its first blocks have no row left (the running max stays -inf
    there: no NaN)."""
    gen = torch.Generator().manual_seed(N2)
    H, G, D, N1, slots = 2, 2, 16, 70, 50
    q = torch.randn(H, G, D, generator=gen).to(DEVICE)
    first = torch.randn(2, H, N1, D, generator=gen).to(DEVICE)
    second = torch.randn(2, H, slots, D, generator=gen).to(DEVICE)
    idx = torch.randint(0, slots, (H, N2), generator=gen)
    idx[torch.rand(H, N2, generator=gen) < 0.5] = -1
    idx[:, : N2 // 2] = -1  # whole blocks left out
    idx = idx.to(DEVICE)
    n1, n2 = (torch.tensor([n], device=DEVICE) for n in (N1, N2))
    out = decode_attention(q, first[0], first[1], n1, second[0], second[1], n2, idx, skip=True)
    ref = decode_attention_ref(q, first[0], first[1], n1, second[0], second[1], n2, idx)
    kept = []
    for h in range(H):  # by hand: the first rows, then the kept second ones
        rows = idx[h][idx[h] >= 0]
        k = torch.cat([first[0, h], second[0, h, rows]])[None]
        v = torch.cat([first[1, h], second[1, h, rows]])[None]
        kept.append(decode_attention_ref(q[h : h + 1], k, v, k.shape[1]))
    torch.testing.assert_close(ref, torch.cat(kept))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_split_rows_bounds_the_number_of_splits(monkeypatch):
    for block, most in ((64, 128), (256, 4)):
        for name, value in (("BLOCK_N", block), ("MAX_SPLITS", most)):
            monkeypatch.setattr(attention_kernels, name, value)
            monkeypatch.setattr(attention_kernels, "INTERPRETED_" + name, value)
        for N in (1, 64, 65, 8192, 131072, 1 << 20):
            split = split_rows(N)
            assert split % block == 0 and -(-N // split) <= most


def _greedy(cache, model, first_logits, steps):
    token, out = int(first_logits.argmax()), []
    for _ in range(steps):
        out.append(token)
        token = int(cache.decode(model, token).argmax())
    return out


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize(
    "name", ["llama-gqa-untied", "qwen3-qknorm-yarn", "phi4-partial-rope", "smollm3-nope"]
)
def test_fixed_shape_step_equals_ordinary_decode(tiny_dirs, kernels, name):
    """The step that CUDA captures (run eagerly here) gives the ordinary decode's tokens
    and logits, with the reference attention and with the Triton kernels (a qwen3
    model's q/k norms among them, Phi-4-mini's partial RoPE and SmolLM3's layers without)."""
    rt = Runtime.from_pretrained(
        tiny_dirs[name][0], dtype="float32", mode="full", device=DEVICE.type
    )
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 3)
    plain, stepped = rt.new_cache(), rt.new_cache()
    stepped.use_step(rt.model, Backend(DEVICE, kernels=kernels, graphs=False))
    logits = [prefill(rt.model, c, ids, 8) for c in (plain, stepped)]
    torch.testing.assert_close(logits[0], logits[1])
    assert _greedy(plain, rt.model, logits[0], 20) == _greedy(stepped, rt.model, logits[1], 20)
    assert stepped.num_tokens == plain.num_tokens == len(ids) + 20
    for a, b in zip(plain.layers, stepped.layers, strict=True):  # the same KV was written
        torch.testing.assert_close(a.k.view(), b.k.view())
        torch.testing.assert_close(a.v.view(), b.v.view())
    # After a truncation (a reused prefix) the step writes over the dropped tokens.
    for c in (plain, stepped):
        c.truncate(len(ids) - 3)
    step_logits = [c.decode(rt.model, 5) for c in (plain, stepped)]
    torch.testing.assert_close(step_logits[0], step_logits[1], atol=1e-5, rtol=1e-5)


def test_rope_table_rows_do_not_depend_on_its_growth(tiny_dirs):
    rt = Runtime.from_pretrained(tiny_dirs["llama3-rope-tied"][0], dtype="float32")
    model = rt.model
    cos_a, sin_a = (t.clone() for t in model.rope(3, 5))
    model.rope_table(20000)  # grown by several blocks
    cos_b, sin_b = model.rope(3, 5)
    assert torch.equal(cos_a, cos_b) and torch.equal(sin_a, sin_b)
    pos = torch.arange(3, 8, dtype=torch.float32, device=model.device)
    freqs = torch.outer(pos, model._inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    torch.testing.assert_close(cos_b, emb.cos())


def test_session_saved_from_the_device_cache_loads_and_answers_alike(tiny_dirs, tmp_path):
    """mode "full" (the device cache, as mode "auto" gives on CUDA while the context fits)
    saves through a tiered copy, and loads back into a device cache."""
    model = tiny_dirs["llama-gqa-untied"][0]
    rt = Runtime.from_pretrained(model, dtype="float32", mode="full")
    rt.load_document("seven quiet stones over the river " * 6)
    assert rt._state.cache.store is None
    before = rt.ask("green?", max_new_tokens=8)
    rt.save_session(tmp_path / "s")
    rt2 = Runtime.load_session(tmp_path / "s", model=model)
    assert rt2._state.cache.store is None and rt2._state.cache.num_tokens == len(rt2._state.ids)
    assert rt2.ask("green?", max_new_tokens=8) == before
    # and into the tiered store ("dense": exact attention over it; "auto" would keep so
    # short a context on the device where CUDA is)
    rt3 = Runtime.load_session(tmp_path / "s", model=model, mode="dense")
    assert rt3._state.cache.store is not None and rt3.ask("green?", max_new_tokens=8) == before


@cuda_only
def test_graph_replay_gives_eager_tokens_and_never_syncs(tiny_dirs):
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full")
    assert rt.backend.graphs and rt.backend.kernels
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 3)
    eager, graphed = rt.new_cache(), rt.new_cache()
    eager.use_step(rt.model, Backend(DEVICE, kernels=True, graphs=False))
    assert graphed.step is not None and graphed.step.backend.graphs
    logits = [prefill(rt.model, c, ids, 8) for c in (eager, graphed)]
    assert _greedy(eager, rt.model, logits[0], 40) == _greedy(graphed, rt.model, logits[1], 40)
    assert graphed.step.captures >= 1
    graphed.decode(rt.model, 7)  # captured for this capacity already
    captures = graphed.step.captures
    _decode_without_syncs(graphed, rt.model, (3, 4, 5))
    assert graphed.step.captures == captures  # replayed, not captured again


@cuda_only
def test_capture_succeeds_while_another_thread_pins_and_copies(tiny_dirs):
    """The runtime's own threads (the session warmer, the slab pinner) pin memory
    and copy to the device while the decode loop may capture its graph: neither side fails."""
    from storage.host import pinned_empty

    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full")
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 3)
    eager, graphed = rt.new_cache(), rt.new_cache()
    eager.use_step(rt.model, Backend(DEVICE, kernels=True, graphs=False))
    logits = [prefill(rt.model, c, ids, 8) for c in (eager, graphed)]
    stop, started, errors = threading.Event(), threading.Event(), []

    def busy() -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                host = pinned_empty((4096 * (n % 64 + 1),), torch.uint8)
                host.to(DEVICE).add_(1)  # (a fresh registration and allocation each time)
                started.set()
        except Exception as e:
            errors.append(e)
            started.set()

    worker = threading.Thread(target=busy)
    worker.start()
    started.wait()
    try:
        graphed_tokens = _greedy(graphed, rt.model, logits[1], 24)
    finally:
        stop.set()
        worker.join()
    assert not errors and graphed.step.captures >= 1
    assert _greedy(eager, rt.model, logits[0], 24) == graphed_tokens


@cuda_only
def test_a_step_stopped_in_its_warm_up_leaves_nothing_unordered(tiny_dirs):
    """Ctrl-C inside the runs that warm a capture up (on a side stream): the compute
    stream still waits for what they queued, whose K/V writes at the step's position
    would otherwise land after the next writes there (emulated, the race check sees it),
    and the next steps decode as if nothing had stopped."""
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full")
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 3)
    whole, stopped = rt.new_cache(), rt.new_cache()
    logits = [prefill(rt.model, c, ids, 8) for c in (whole, stopped)]
    layer = rt.model.layers[1]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # (after layer 0 queued its work)

    layer.forward = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            stopped.decode(rt.model, int(logits[1].argmax()))
    finally:
        del layer.forward
    assert _greedy(stopped, rt.model, logits[1], 6) == _greedy(whole, rt.model, logits[0], 6)


def _decode_without_syncs(cache, model, tokens) -> None:
    """Decode `tokens` with CUDA's sync debug mode raising on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in tokens:
            cache.decode(model, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_default_config_on_cuda_keeps_the_embedded_models_kv_on_the_device():
    rt = Runtime.from_pretrained("smollm2")
    cache = rt._state.cache
    assert cache.store is None and cache.step is not None
    # (2 tokens: the prefill's and a step's, the first time warmed up, captured and
    # replayed, the second time replayed; emulated, every launch of the 30 layers runs in
    # Triton's interpreter)
    text = rt.generate("Count to five.", max_new_tokens=2)
    assert text and text == rt.generate("Count to five.", max_new_tokens=2)
    assert cache.step.captures == 1


@pytest.mark.parametrize("block", ["as on a GPU", "as interpreted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_kernel_matches_reference(dtype, block, monkeypatch):
    """Selected tokens through a shuffled slot table (chunks out of order, as after a
    spill and reload), K and V in one launch (in programs of the GPU's 32 ids, or the
    interpreter's more)."""
    from offload.kernels import gather
    from offload.kernels.gather import gather_kv, gather_kv_ref

    if block == "as on a GPU":
        monkeypatch.setattr(gather, "INTERPRETED_BLOCK_K", gather.BLOCK_K)

    gen = torch.Generator().manual_seed(0)
    H, slots, C, D, k = 3, 40, 16, 64, 77
    slab = torch.randn(2, H, slots, C, D, generator=gen).to(dtype)
    slot_table = torch.randperm(slots, generator=gen)
    ids = torch.sort(torch.randint(0, slots * C, (H, k), generator=gen), dim=1).values
    slab, slot_table, ids = slab.to(DEVICE), slot_table.to(DEVICE), ids.to(DEVICE)
    ref = gather_kv_ref(slab, slot_table, ids)
    assert ref.shape == (2, H, k, D)
    assert torch.equal(ref[1, 2, 5], slab[1, 2, slot_table[ids[2, 5] // C], ids[2, 5] % C])
    assert torch.equal(gather_kv(slab, slot_table, ids), ref)


@cuda_only
def test_gather_kernel_reads_pinned_host_memory():
    from offload.kernels.gather import device_view, gather_kv, gather_kv_ref

    slab = torch.randn(2, 2, 8, 16, 64, dtype=torch.bfloat16).pin_memory()
    slot_table = torch.arange(8)
    ids = torch.tensor([[0, 5, 100], [3, 64, 127]])
    view = device_view(slab, DEVICE)
    assert view.device.type == "cuda" and view.data_ptr() == slab.data_ptr()
    got = gather_kv(view, slot_table.to(DEVICE), ids.to(DEVICE))
    assert torch.equal(got.cpu(), gather_kv_ref(slab, slot_table, ids))
