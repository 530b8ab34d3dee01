"""Mode "auto" where host memory is not the compute device's (CUDA): the KV stays in the
device cache while it fits `kv.device_bytes`, then the same cache moves to the tiers.

Run on the CPU with the backend CUDA gets (fixed-shape steps, dense layers mirrored,
layer-by-layer prefill), the steps eagerly and with the kernels' references.
"""

import pytest
import torch

from offload import Runtime
from offload.backend import Backend
from offload.errors import ConfigError
from offload.kvcache import DenseLayer
from offload.tiered_step import TieredPlan
from storage.tiered import TieredStore
from tests.conftest import DEVICE


@pytest.fixture(autouse=True)
def _as_on_cuda(monkeypatch):
    """Every Runtime here gets CUDA's backend (on a CPU: eager steps, the kernels' torch
    references), and dense attention cannot read host KV in place, as on CUDA (on a CPU
    it can, and mode "auto" would then never select)."""
    backend = Backend(DEVICE, kernels=DEVICE.type == "cuda", fixed_shape=True,
                      graphs=DEVICE.type == "cuda", remote_host=True)  # fmt: skip
    monkeypatch.setattr(Backend, "for_device", classmethod(lambda cls, *a, **k: backend))
    monkeypatch.setattr(TieredStore, "in_place", lambda self, layer: False)


PROMPT = "seven quiet stones over the river " * 4  # 60-odd tokens of the tiny tokenizer
LIMIT = 100  # tokens the device budget below holds


def _budgeted(path, limit=LIMIT, **overrides):
    """A runtime in mode "auto" whose device budget holds `limit` tokens of KV, driven
    as on CUDA; at full retrieval budget (sparse decode equals dense)."""
    cfg = dict(dtype="float32", mode="auto", sink=4, window=32, retrieved=100_000,
               dense_layers=1, sparse_threshold=64, candidate_factor=2, prefetch="off")  # fmt: skip
    probe = Runtime.from_pretrained(path, **{**cfg, **overrides})
    L = probe.layout
    budget = limit * (L.token_bytes + L.token_bytes_per_layer)
    return Runtime(probe.loaded, probe.config.replace(device_bytes=budget), probe.device)


def _device_kv_bytes(cache) -> int:
    """Bytes the device cache's buffers hold (capacity, not length)."""
    return sum(
        2 * layer.k.data.numel() * layer.k.data.element_size()
        for layer in cache.layers
        if isinstance(layer, DenseLayer)
    )


def test_device_cache_moves_to_the_tiers_when_it_outgrows_its_budget(tiny_dirs):
    path = tiny_dirs["llama-gqa-untied"][0]
    dense = Runtime.from_pretrained(path, dtype="float32", mode="full")
    rt = _budgeted(path, window=24)  # (the tiered KV's device part fits the budget)
    assert rt.device_kv_tokens() == LIMIT
    cache = rt._state.cache
    assert cache.store is None and cache.device_limit == LIMIT
    budget = rt.config.kv.device_bytes
    want = [s.token_id for s in dense.stream(PROMPT, max_new_tokens=60)]
    got, peak = [], 0
    for step in rt.stream(PROMPT, max_new_tokens=60):
        got.append(step.token_id)
        if cache.store is None:
            peak = max(peak, _device_kv_bytes(cache))
    assert got == want
    assert 0 < peak <= budget
    # The same object is now tiered: the dense layer kept its device buffers as its
    # mirror, the sparse layer decoded through the fixed-shape tiered step.
    assert cache is rt._state.cache and cache.store is not None
    assert cache.device_limit is None and cache.layers[0].mirror is not None
    assert isinstance(cache.step.plan, TieredPlan) and cache.step.plan.steps > 0
    assert cache.store.num_tokens == cache.num_tokens > LIMIT
    assert cache.policy.indexed[1]  # built from the keys still on the device
    # A second turn reuses the tiered KV and still equals dense.
    a, b = rt.chat(), dense.chat()
    a._state = rt._state
    b._state = dense._state
    a.messages = b.messages = [{"role": "user", "content": PROMPT}]
    assert a.send("green north", max_new_tokens=12) == b.send("green north", max_new_tokens=12)


def test_a_prompt_longer_than_the_budget_is_prefilled_layer_by_layer(tiny_dirs, monkeypatch):
    path = tiny_dirs["llama-gqa-untied"][0]
    dense = Runtime.from_pretrained(path, dtype="float32", mode="full")
    rt = _budgeted(path, limit=80, window=16)  # (the tiered KV's device part fits the budget)
    import offload.generate as generate

    layered = []
    real = generate.prefill_by_layer
    monkeypatch.setattr(generate, "prefill_by_layer", lambda *a: layered.append(1) or real(*a))
    assert rt.generate(PROMPT, max_new_tokens=16) == dense.generate(PROMPT, max_new_tokens=16)
    assert layered == [1] and rt._state.cache.store is not None


def test_a_budget_below_the_sparse_threshold_decodes_eagerly_after_the_move(tiny_dirs):
    """Between the device limit and `sparse_threshold` the tiered cache attends densely
    (the eager path), and is still exact."""
    path = tiny_dirs["llama-gqa-untied"][0]
    dense = Runtime.from_pretrained(path, dtype="float32", mode="full")
    rt = _budgeted(path, sparse_threshold=4096)
    assert rt.generate(PROMPT, max_new_tokens=50) == dense.generate(PROMPT, max_new_tokens=50)
    cache = rt._state.cache
    assert cache.store is not None and cache.step.plan.steps == 0


def test_a_session_larger_than_the_budget_loads_into_the_tiers(tiny_dirs, tmp_path):
    """...or is refused, naming the session, where even the tiered KV's device part
    (the dense layer's KV, summaries, index) would not fit the budget."""
    path = tiny_dirs["llama-gqa-untied"][0]
    full = Runtime.from_pretrained(path, dtype="float32", mode="full")
    full.load_document(PROMPT * 2)
    before = full.ask("green?", max_new_tokens=8)
    full.save_session(tmp_path / "s")
    for limit, tiered in ((1000, False), (130, True)):  # (130: room for its device part)
        rt = _budgeted(path, limit=limit)
        loaded = Runtime.load_session(tmp_path / "s", model=rt, config=rt.config)
        assert (loaded._state.cache.store is not None) == tiered
        assert loaded._state.cache.num_tokens == len(loaded._state.ids) > LIMIT
        assert loaded.ask("green?", max_new_tokens=8) == before
    rt = _budgeted(path, limit=60)
    with pytest.raises(ConfigError, match=f"session {tmp_path / 's'} reaches .* kv.device_bytes"):
        Runtime.load_session(tmp_path / "s", model=rt, config=rt.config)


@pytest.mark.parametrize("limit", [0, 10**9])
def test_budget_extremes(tiny_dirs, limit):
    """No room at all: the tiered store from the start, and a request refused (its KV's
    device part cannot fit); room for the whole window: a device cache without a bound
    (it never moves)."""
    rt = _budgeted(tiny_dirs["llama-gqa-untied"][0], limit=limit)
    cache = rt._state.cache
    if limit == 0:
        assert cache.store is not None
        with pytest.raises(ConfigError, match="over kv.device_bytes = 0 B"):
            rt.generate(PROMPT, max_new_tokens=4)
        return
    assert cache.store is None and cache.device_limit is None
    assert rt.device_kv_tokens() == rt.args.max_seq_len
    assert rt.generate(PROMPT, max_new_tokens=4)
    torch.testing.assert_close(rt.logits([5, 6, 7]).shape, torch.Size([3, rt.args.vocab_size]))
