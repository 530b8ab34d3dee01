"""The host budget bounds the host memory the KV takes (on CUDA the pinned slabs, on a CPU
the slabs' resident pages), not only the chunks counted in it, and a machine that
page-locks less than the budget gets one clear error naming what to change."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from offload import HostMemoryError, Runtime
from offload.errors import ConfigError
from storage import pinning
from storage.layout import KVLayout
from storage.tiered import TieredStore
from storage.warm import Warmer
from tests.conftest import filler_text, make_tiny_hf_model, on_cuda

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16", chunk_size=4)


def past_the_budget(tmp_path, T: int = 1024, host_chunks: int = 128):
    """A CUDA store (emulated off a GPU) given T tokens of random KV in every layer, a
    layer at once as a layer-by-layer prefill does: 8x its host budget by default."""
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, T, LAYOUT.head_dim, generator=g)
    kv = kv.to(torch.bfloat16)
    store = TieredStore(
        LAYOUT, torch.bfloat16, torch.device("cuda"),
        host_bytes=host_chunks * LAYOUT.chunk_bytes, disk_dir=tmp_path / "kv",
        disk_bytes=1 << 30, sink=4, window=8, spill_batch=2, max_tokens=T,
    ).start()  # fmt: skip
    for layer in range(LAYOUT.num_layers):
        store.append(layer, kv[layer, 0].cuda(), kv[layer, 1].cuda())
    store.settle()
    return store, kv


@pytest.mark.parametrize("T, host_chunks", [(1024, 128), (8192, 1024)])
def test_whole_layers_past_the_host_budget_keep_the_pinned_slabs_within_it(
    tmp_path, T, host_chunks
):
    """A layer-by-layer prefill appends each layer's KV at once. Past the host budget a
    layer keeps its share of it (its newest chunks) and spills the rest as it goes; before,
    each layer's slab grew to the layer's whole KV and stayed so (the other layers' older
    chunks were spilled instead), pinning the context's KV whatever the budget. (8x the
    budget: 256 or 2,048 chunks a layer.)"""
    with on_cuda():
        store, kv = past_the_budget(tmp_path, T, host_chunks)
        share = host_chunks // LAYOUT.num_layers
        assert [h.num_chunks for h in store.host] == [share] * LAYOUT.num_layers
        # each slab: its share and the pieces in flight (two at most: 1/16 of the share
        # or a spill batch each), in the pinning's steps (32 slots here); before, growth
        # steps of an eighth more went past that (384 slots a layer at 8,192 tokens)
        piece = max(2, share // 16)
        m = pinning.slot_multiple(LAYOUT.chunk_size * LAYOUT.head_dim * 2)
        slots = sum(h.capacity for h in store.host)
        assert store.host[0].slab.is_pinned()
        assert slots <= LAYOUT.num_layers * -(-(share + 2 * piece) // m) * m
        for layer in range(LAYOUT.num_layers):  # every token where it went, exactly
            k, v = store.gather_all(layer)
            assert torch.equal(k.cpu(), kv[layer, 0]) and torch.equal(v.cpu(), kv[layer, 1])
            assert store.directory.on_host((layer, T // 4 - 1))  # (the newest stayed)
        store.close()


def test_a_selection_past_a_layers_share_takes_the_rest_from_what_it_read(tmp_path):
    """A selection of chunks that are on disk, on a layer at its share of the budget:
    the rows of those that find no room come from what was read, not from the layer's
    slab grown to hold them all (then spilled again: a pinned slab does not shrink), and
    no chunk leaves to make room for them (measured: chunks kept so were seldom the next
    step's, and cost more reads). Slots freed (here by a cut) take the most selected."""
    with on_cuda():
        store, kv = past_the_budget(tmp_path)
        layer, share, H = 2, store.directory.host_capacity // LAYOUT.num_layers, 2
        host = store.host[layer]
        slots = host.capacity
        g = torch.Generator().manual_seed(4)
        chunks = [torch.randperm(200, generator=g)[:12] for _ in range(H)]  # 24 < share
        ids = torch.stack([(c[:, None] * 4 + torch.arange(4)).flatten()[::2] for c in chunks])
        want = torch.stack([kv[layer][:, h, ids[h]] for h in range(H)], dim=1)
        selected = set(torch.cat(chunks).tolist())

        def read() -> int:  # the chunks read from disk
            before = store.reads.count["disk"]
            got = store.gather_selected(layer, ids.cuda())
            assert torch.equal(got.cpu(), want)
            assert host.capacity == slots and host.num_chunks <= share
            store.settle()
            return store.reads.count["disk"] - before

        def bytes_read() -> dict[str, int]:
            return dict(store.reads.nbytes)

        at = bytes_read()
        assert read() == len(selected)  # (no room: nothing kept, nothing spilled)
        got = {t: n - at[t] for t, n in bytes_read().items()}  # each row counted once
        assert got["host"] + got["disk"] == ids.numel() * LAYOUT.row_bytes and got["disk"] > 0
        assert read() == len(selected)
        assert store.spilled_chunks == 1024 - 128
        store.truncate(1024 - 16 * 4)  # the newest 16 chunks of each layer: 16 slots free
        assert read() == len(selected)
        assert read() == len(selected) - 16  # (the 16 most selected were kept)
        assert len(selected) - len(host.missing(torch.tensor(sorted(selected)))) == 16
        store.close()


def test_a_selection_of_chunks_the_spill_in_flight_moves_still_reads_them(tmp_path):
    """A selection of chunks on disk and of chunks that the spill in flight moves (still
    on the host, so not read) reads them all, exactly: the spill in flight is applied
    (its chunks leave the host) only after the gather. (Before, a spill for room ran
    first and the chunks it moved were gone when the gather came to them: found by a
    runtime with the prefetch on, whose steps select again before a spill is applied.)"""
    with on_cuda():
        store, kv = past_the_budget(tmp_path)
        layer = 2
        more = torch.randn(2, LAYOUT.num_kv_heads, 12, LAYOUT.head_dim).to(torch.bfloat16)
        store.append(layer, more[0].cuda(), more[1].cuda())  # past its share: a spill
        leaving = sorted(c for i, c in store._writer.leaving() if i == layer)
        assert leaving
        chunks = torch.tensor(leaving[:6] + list(range(100, 106)))
        ids = (chunks[:, None] * 4 + torch.arange(4)).flatten().expand(2, -1)
        got = store.gather_selected(layer, ids.cuda())
        assert torch.equal(got.cpu(), kv[layer][:, :, ids[0]])
        store.close()


@contextlib.contextmanager
def page_lock_limit(more: int):
    """The driver page-locks at most `more` bytes more in the block, as WSL2's may allow
    less than the machine has: a registration past it is refused (`cudaHostRegister`,
    which storage.pinning calls), and so is torch's pinned allocator after it."""
    limit = pinning.registered_bytes() + more
    register, empty = pinning._register, torch.empty

    def limited(cudart, ptr, nbytes):
        return pinning.registered_bytes() + nbytes <= limit and register(cudart, ptr, nbytes)

    def refusing(*args, **kwargs):
        if kwargs.get("pin_memory"):
            raise RuntimeError("CUDA error: out of memory")  # (torch's, from cudaHostAlloc)
        return empty(*args, **kwargs)

    with (
        mock.patch.object(pinning, "_register", limited),
        mock.patch.object(torch, "empty", refusing),
    ):
        yield


def test_a_machine_that_page_locks_less_than_the_host_budget_gets_one_clear_error(tmp_path):
    """The prompt whose KV passes what the machine page-locks stops with one error (a
    StorageError: one line in the CLI) that says so and names kv.host_bytes; a budget
    below the limit then answers as the same runtime does without a limit."""
    path = tmp_path / "model"
    make_tiny_hf_model(path, "llama-gqa-untied", max_positions=2048)
    prompt = filler_text(500, seed=1)  # 1,123 tokens
    with on_cuda():
        rt = Runtime.from_pretrained(path, dtype="float32", device="cuda", mode="sparse",
                                     sink=4, window=16, dense_layers=1, retrieved=16,
                                     sparse_threshold=32, spill_batch=4, prefetch="off",
                                     disk_dir=str(tmp_path / "kv"))  # fmt: skip
        loaded, config = rt.loaded, rt.config
        kv_bytes = len(rt.tokenizer.encode(prompt)) * rt.layout.token_bytes
        with rt:  # (its pinned slabs let go at the end)
            want = rt.generate(prompt, max_new_tokens=6)
        # (the whole prompt's KV took 1.4x its size pinned; an eighth of it as the budget,
        # 0.4x: the slabs' growth steps, a few spills in flight, a decode step's reads)
        with page_lock_limit(kv_bytes * 6 // 10):
            with Runtime(loaded, config, torch.device("cuda")) as refused:
                with pytest.raises(HostMemoryError, match="page-lock.*kv.host_bytes"):
                    refused.generate(prompt, max_new_tokens=6)
            smaller = config.replace(host_bytes=kv_bytes // 8)
            with Runtime(loaded, smaller, torch.device("cuda")) as rt:
                got = rt.generate(prompt, max_new_tokens=6)
        assert got == want


def test_a_session_past_the_host_budget_is_read_in_to_each_layers_share(tmp_path):
    """A loaded session whose KV passes the host budget is read into host memory, on
    CUDA, to each layer's share of the budget: before, the last layers were read in whole
    until the budget was full, and the questions' reads of the other layers then spilled
    those first (past their shares) while their slabs kept their size. A question then
    keeps the slabs as they were."""
    path = tmp_path / "model"
    make_tiny_hf_model(path, "llama-gqa-untied", max_positions=2048)
    with on_cuda():
        rt = Runtime.from_pretrained(path, dtype="float32", device="cuda", mode="sparse",
                                     sink=4, window=16, dense_layers=1, retrieved=16,
                                     sparse_threshold=32, spill_batch=4, prefetch="off",
                                     disk_dir=str(tmp_path / "kv"))  # fmt: skip
        with rt:
            rt.load_document(filler_text(500, seed=1))
            want = rt.ask("seven stones?", max_new_tokens=6)
            rt.save_session(tmp_path / "doc")
            kv_bytes = rt._state.cache.num_tokens * rt.layout.token_bytes
        budget = kv_bytes // 4
        with Runtime.load_session(tmp_path / "doc", model=rt, host_bytes=budget) as loaded:
            store = loaded._state.cache.store
            store.warm().wait()
            share = store.directory.host_capacity // store.layout.num_layers
            assert [h.num_chunks for h in store.host] == [share] * store.layout.num_layers
            slots = sum(h.capacity for h in store.host) * store.layout.chunk_bytes
            assert slots <= 1.5 * budget  # (the growth steps)
            assert loaded.ask("seven stones?", max_new_tokens=6) == want
            # (its reads of the chunks on disk did not grow the slabs: 24 slots grew to 88)
            assert sum(h.capacity for h in store.host) * store.layout.chunk_bytes <= 1.5 * budget
        # A question's reads that fill a layer's share while the warmer reads that layer's
        # file leave the warmer fewer slots than it read for: it goes on with the other
        # layers (it stopped, as it does when the whole budget is full)
        with mock.patch.object(Warmer, "start", lambda self: self):  # (run below, here)
            with Runtime.load_session(tmp_path / "doc", model=rt, host_bytes=budget) as again:
                store, asked = again._state.cache.store, []
                read_all, last = store.disk.read_all, store.layout.num_layers - 1

                def read_meanwhile(name):
                    data = read_all(name)
                    if not asked:  # (the warmer reads the last layer first)
                        asked.append(name)
                        T = store.lengths[last]
                        ids = torch.arange(T - 16 * 12, T - 16).expand(2, -1)  # 11 chunks
                        with store.lock:
                            store.gather_selected(last, ids)
                    return data

                with mock.patch.object(store.disk, "read_all", read_meanwhile):
                    store.warm().run()
                assert asked and [h.num_chunks for h in store.host] == [share] * len(store.host)


@pytest.mark.parametrize("head_dim", [128, 64])  # a slot of a plane: a page, half a page
def test_a_cpu_past_the_host_budget_keeps_its_memory_within_it(tmp_path, head_dim):
    """On a CPU the host budget is one LRU over every layer, so chunks leave one layer for
    another's reads. The memory of the slots they leave is given back (whole pages of
    free slots only: every row read afterwards is exact), and a selection's chunks on
    disk past the room left are read from their files, not all put on the host first.
    Before, each layer's slab kept the memory of the most it had ever held: after a
    prefill and a few steps past a budget of a quarter of the KV, the slabs held about
    the whole KV."""
    L = KVLayout(num_layers=4, num_kv_heads=2, head_dim=head_dim, dtype="bfloat16",
                 chunk_size=16)  # fmt: skip
    T, host_chunks = 2048, 128  # 128 chunks a layer, 512 in all: 4x the budget
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(L.num_layers, 2, L.num_kv_heads, T, head_dim, generator=g)
    kv = kv.to(torch.bfloat16)
    store = TieredStore(
        L, torch.bfloat16, torch.device("cpu"), host_bytes=host_chunks * L.chunk_bytes,
        disk_dir=tmp_path / "kv", disk_bytes=1 << 30, sink=16, window=64, spill_batch=16,
        max_tokens=T,
    ).start()  # fmt: skip
    for t0 in range(0, T, 256):  # a prefill's chunks through every layer
        for layer in range(L.num_layers):
            store.append(layer, kv[layer, 0, :, t0 : t0 + 256], kv[layer, 1, :, t0 : t0 + 256])
    for _ in range(4):  # decode steps: 48 chunks a head in every layer, a token of each
        for layer in range(L.num_layers):
            chunks = torch.stack([torch.randperm(128, generator=g)[:48] for _ in range(2)])
            ids = chunks * 16 + torch.randint(0, 16, chunks.shape, generator=g)
            got = store.gather_selected(layer, ids)
            want = torch.stack([kv[layer][:, h, ids[h]] for h in range(2)], dim=1)
            assert torch.equal(got, want)
    store.settle()
    assert store.directory.host_count <= host_chunks
    resident = sum(pinning.resident_bytes(h.slab) for h in store.host)
    assert resident <= 1.25 * host_chunks * L.chunk_bytes, (resident, L.chunk_bytes)
    store.close()


def test_the_cpu_budget_probe_measures_the_slabs_within_the_budget(tmp_path):
    """scripts/probe_cpu_budget.py (docs/storage.md's CPU table) at a small size: the
    embedded model's document within the budget and past it, the slabs' resident memory
    measured after each question."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "scripts/probe_cpu_budget.py", "--tokens", "1200",
           "--questions", "1", "--new", "2", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    within, past = json.loads(out.read_text())["rows"]
    assert within["spilled_chunks"] == 0 and past["spilled_chunks"] > 0
    budget = past["host_budget_mib"]
    assert past["kv_mib"] > 3 * budget and past["questions"][0]["disk_read_mib"] > 0
    assert past["kv_resident_after_document_mib"] <= 1.25 * budget
    assert past["questions"][0]["kv_resident_mib"] <= 1.25 * budget
    assert within["kv_resident_after_document_mib"] >= within["kv_mib"]


def test_mode_auto_on_a_cpu_keeps_the_dense_cache_until_the_host_budget(tiny_dirs, tmp_path):
    """Mode "auto" on a CPU: the KV in the dense cache (mode "full"'s, the fastest there)
    while it fits `kv.host_bytes`; before a request would pass that, the same cache in
    the tiers, which spill past the budget and attend sparsely to what left (at full
    retrieval budget: as dense, token for token)."""
    path = tiny_dirs["llama-gqa-untied"][0]
    dense = Runtime.from_pretrained(path, dtype="float32", mode="full")
    cfg = dict(dtype="float32", mode="auto", sink=4, window=32, retrieved=100_000,
               dense_layers=1, sparse_threshold=64, device="cpu", disk_dir=str(tmp_path))  # fmt: skip
    probe = Runtime.from_pretrained(path, **cfg)
    L = probe.layout
    budget = 100 * (L.token_bytes + L.token_bytes_per_layer)
    rt = Runtime(probe.loaded, probe.config.replace(host_bytes=budget), probe.device)
    assert rt.device_kv_tokens() == 100
    cache = rt._state.cache
    first = [s.token_id for s in rt.stream("seven quiet stones", max_new_tokens=8)]
    assert cache.store is None and cache.device_limit == 100  # (within the budget)
    assert first == [s.token_id for s in dense.stream("seven quiet stones", max_new_tokens=8)]
    prompt = "seven quiet stones over the river " * 4  # (99 tokens: past it as it answers)
    got = [s.token_id for s in rt.stream(prompt, max_new_tokens=150)]
    assert got == [s.token_id for s in dense.stream(prompt, max_new_tokens=150)]
    assert cache is rt._state.cache and cache.store is not None
    assert cache.store.spilled_chunks > 0 and rt.stats()["selection"]["sparse_layer_steps"] > 0


def test_a_request_that_would_spill_past_the_disk_room_is_refused_before_it_runs(
    tiny_dirs, tmp_path
):
    """Chunks past the host budget spill to disk; a request (or a document) whose spill
    would pass the disk's room (`kv.disk_bytes`, else its free space less a margin) is
    refused before anything is computed, naming both. Before, the prefill ran until a
    write failed (a full disk, after minutes on a long prompt). One within the room runs."""
    path = tiny_dirs["llama-gqa-untied"][0]
    cfg = dict(dtype="float32", mode="auto", sink=4, window=32, dense_layers=1,
               sparse_threshold=64, device="cpu")  # fmt: skip
    probe = Runtime.from_pretrained(path, **cfg)
    L = probe.layout
    budget = 100 * (L.token_bytes + L.token_bytes_per_layer)  # (100 tokens in the dense cache)
    document = filler_text(70, seed=4)  # (about 200 tokens: past the budget)

    def runtime(disk_bytes: int, where: Path) -> Runtime:
        config = probe.config.replace(host_bytes=budget, disk_bytes=disk_bytes, disk_dir=str(where))
        return Runtime(probe.loaded, config, probe.device)

    tight = runtime(L.disk_bytes_per_chunk(), tmp_path / "tight")
    with pytest.raises(ConfigError, match=r"the document reaches [\d,]+ tokens of context; .* "
                       r"would then spill to disk past kv.host_bytes, and .*tight has room"):  # fmt: skip
        tight.load_document(document)
    assert tight._state.cache.num_tokens == 0 and not any((tmp_path / "tight").glob("**/*.arrow"))
    with pytest.raises(ConfigError, match="this request reaches"):
        tight.generate(document, max_new_tokens=4)
    roomy = runtime(1 << 30, tmp_path / "roomy")
    roomy.load_document(document)
    store = roomy._state.cache.store
    assert store.spilled_chunks > 0 and store.disk.used_bytes > L.disk_bytes_per_chunk()
    assert roomy.ask("seven stones?", max_new_tokens=2)  # (checked against the store's room)
    # the room it took (file framing included) is room enough
    again = runtime(store.disk.used_bytes, tmp_path / "again")
    again.load_document(document)
    assert again._state.cache.store.spilled_chunks == store.spilled_chunks
