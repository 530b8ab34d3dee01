"""`offload plan` from a config.json alone (no weights)."""

import json

import pytest
from click.testing import CliRunner

from cli.main import main
from offload.plan import make_plan

GiB = 1 << 30

LLAMA31_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "eos_token_id": [128001, 128008, 128009],
}  # fmt: skip


def write_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    return tmp_path


def test_plan_llama31_8b_128k_from_config_only(tmp_path):
    d = write_config(tmp_path)
    p = make_plan(d, 131072, device_bytes=24 * GiB, host_bytes=64 * GiB)
    assert p.dense_kv_bytes == 16 * GiB
    host_kv = lambda p: next(r for r in p.rows if r.what == "full-precision K and V").nbytes  # noqa: E731
    row = lambda p, what: next(r for r in p.rows if r.what.startswith(what)).nbytes  # noqa: E731
    abstracts = next(r for r in p.rows if r.what.startswith("chunk abstracts"))
    assert (
        abstracts.tier == "host" and abstracts.nbytes == 3 * GiB
    )  # (only the chunk selector reads them)
    # the cluster index of the 30 sparse layers: 8192 clusters x 8 heads, float32 centroids
    # (+ bias, count) and int32 token map on the device; centroids and member sums
    # float32 and an int64 token map in host memory
    assert row(p, "cluster index (centroids") == 30 * 8 * (8192 * 130 * 4 + 131072 * 4)
    assert row(p, "cluster index (k-means") == 30 * 8 * (8192 * 256 * 4 + 131072 * 8)
    host_index = row(p, "cluster index (k-means")
    assert host_kv(p) == 16 * GiB and p.tier_total("host") == 19 * GiB + host_index
    assert p.tier_total("disk") == 0
    # hit caches: 3 x 5% of 128k (6554) tokens per head and sparse layer, + a scratch slot
    # (K, V bf16 + two int64 tags), and a slot map over the context (int32)
    assert row(p, "hit caches (19,662 tokens") == 30 * 8 * (19663 * (512 + 16) + 131073 * 4)
    preset = make_plan(d, 131072, 24 * GiB, 64 * GiB, retrieved=2048)
    assert row(preset, "hit caches (6,144 tokens") == 30 * 8 * (6145 * (512 + 16) + 131073 * 4)
    assert make_plan(d, 131072, 24 * GiB, 64 * GiB, hit_cache=None).tier_total("device") == (
        p.tier_total("device") - row(p, "hit caches")
    )
    assert make_plan(d, 131072, 24 * GiB, 64 * GiB, selector="chunk").tier_total(
        "device"
    ) == p.tier_total("device") + 3 * GiB - row(p, "cluster index (centroids")
    weights = next(r for r in p.rows if r.what == "weights").nbytes
    assert abs(weights / 2 - 8.03e9) < 0.01e9  # 8.03B parameters in bf16
    assert p.fits_device and p.fits_host
    mirror = next(r for r in p.rows if r.what.startswith("KV of the 2 dense layers"))
    assert mirror.nbytes == 2 * 131072 * 2 * 8 * 128 * 2  # 1 GiB on the GPU
    # 16 GiB of KV and 15 GiB of weights exceed 24 GiB: auto on CUDA keeps the KV on the
    # device while it fits beside the weights and the reserve (128 KiB + 4 KiB a token)
    assert p.device_kv_bytes == 24 * GiB - weights - GiB
    assert p.device_kv_tokens == p.device_kv_bytes // (131072 + 4096) < 131072
    # a layer-by-layer prefill adds the hidden states (128k x 4096 x 2 B, updated in place)
    # and two layers' KV (128k x 2 x 8 x 128 x 2 B each) to what decode holds, less the
    # hit caches and the index's device copy (made at the first decode step)
    later = row(p, "hit caches") + row(p, "cluster index (centroids")
    assert p.prefill_peak_bytes == p.tier_total("device") - later + GiB + GiB
    assert p.prefill_peak_bytes < 22 * GiB
    big = make_plan(d, 8192, device_bytes=80 * GiB, host_bytes=64 * GiB)
    assert big.device_kv_tokens == big.args.max_seq_len  # the whole window fits
    # with 4 GiB of host memory, the other 12 GiB of KV (plus abstracts) go to disk
    p = make_plan(d, 131072, device_bytes=24 * GiB, host_bytes=4 * GiB)
    assert host_kv(p) == 4 * GiB
    spilled = 131072 // 16 * 32 - 4 * GiB // p.layout.chunk_bytes
    assert p.tier_total("disk") == spilled * p.layout.disk_bytes_per_chunk()
    # a context that ends in a partial chunk: that chunk is held in host memory too
    odd = make_plan(d, 107_000, device_bytes=24 * GiB, host_bytes=64 * GiB)
    assert odd.tier_total("disk") == 0 and host_kv(odd) == 107_000 * 131072


def test_plan_cli(tmp_path):
    d = write_config(tmp_path)
    r = CliRunner().invoke(
        main,
        ["plan", "-m", str(d), "--context", "131072", "--gpu-mem", "24GiB", "--host-mem", "64GiB"],
    )
    assert r.exit_code == 0, r.output
    assert "dense KV would be 16.00 GiB" in r.output and "fits" in r.output
    assert 'mode "auto" keeps all KV on the device up to 63,' in " ".join(r.output.split())
    assert "prefill, layer by layer: peak device memory" in r.output
    # 16 GiB of KV, 3 of abstracts twice, 2 of summaries (26.3 GiB saved on the H200)
    assert "saved as a session (`offload ingest`, /save): at least 24.00 GiB on disk" in r.output
    r = CliRunner().invoke(
        main,
        ["plan", "-m", str(d), "--context", "131072", "--gpu-mem", "8GiB", "--host-mem", "64GiB"],
    )
    assert r.exit_code == 1 and "does not fit" in r.output
    r = CliRunner().invoke(  # a preset's settings: its kv.device_bytes bounds the device KV
        main,
        ["plan", "-m", str(d), "-n", "131072", "--gpu-mem", "24GiB", "--host-mem", "64GiB",
         "-c", "rtx4090-llama3.1-8b"],
    )  # fmt: skip
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "keeps all KV on the device up to 47,662 tokens" in out
    assert "hit caches (6,144 tokens" in out  # the preset retrieves 2048 tokens
    assert "it does:" not in out  # (128k is past the bound)
    r = CliRunner().invoke(  # below the bound: the KV kept on the device, in buffers that double
        main,
        ["plan", "-m", str(d), "-n", "8192", "--gpu-mem", "24GiB", "-c", "rtx4090-llama3.1-8b"],
    )
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "at 8,192 tokens it does: up to 17.96 GiB of device" in out
    r = CliRunner().invoke(main, ["plan", "-m", str(d), "--context", "100", "--gpu-mem", "lots"])
    assert r.exit_code == 2 and "--gpu-mem: cannot read 'lots'" in r.output


@pytest.mark.parametrize("retrieved,slots", [(16, 48), (100_000, 3 * (256 - 4 - 32))])
def test_plan_predicts_what_a_tiered_step_holds_on_the_device(tiny_dirs, retrieved, slots):
    """The plan's rows against the buffers a tiered cache decoding as on CUDA (here with
    the torch references) holds: summaries and hit caches exactly (but for the slot
    map, sized by the index's token capacity), the device index within its growth. A
    selection past the far tokens is held to them (the model's window of 256 less sink
    and window), as the step holds it."""
    import torch

    from offload import Runtime
    from offload.backend import Backend
    from offload.generate import prefill
    from offload.plan import plan_for_config
    from tests.conftest import DEVICE

    path = tiny_dirs["llama-gqa-untied"][0]
    rt = Runtime.from_pretrained(path, dtype="float32", mode="sparse", sink=4, window=32,
                                 retrieved=retrieved, dense_layers=1, prefetch="cache",
                                 candidate_factor=2, cluster_size=8)  # fmt: skip
    rt.backend = Backend(DEVICE, kernels=False, fixed_shape=True, remote_host=True)
    cache = rt.new_cache()
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:200]
    token = int(prefill(rt.model, cache, ids, 64).argmax())
    cache.finish_prefill()
    for _ in range(8):
        token = int(cache.decode(rt.model, token).argmax())
    cache.flush()
    T, step = cache.num_tokens, cache.step.plan
    assert step.steps == 8
    p = plan_for_config(path, T, 1 << 40, 1 << 40, rt.config)
    row = lambda what: next(r for r in p.rows if r.what.startswith(what)).nbytes  # noqa: E731
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    summaries = sum(nbytes(d.codes.view(), d.scale.view(), d.zero.view()) for d in cache.store.dev)
    assert summaries == row("2-bit key summaries")
    hc, H = step.hit_caches[1], rt.args.num_kv_heads
    slot_map_extra = H * 4 * (hc.token_capacity - T)  # the map covers the index's capacity
    assert hc.slots == slots and slot_map_extra >= 0
    held = nbytes(hc.kv, hc.token_of, hc.used, hc.slot_of)
    assert held == row("hit caches") + slot_map_extra
    idx = step.indexes[1]
    index = nbytes(idx.centroids, idx.bias, idx.counts, idx.assign)
    assert 0.75 <= index / row("cluster index (centroids") <= 1.5
    assert cache.store.dev[1].scale.data.dtype == torch.float16  # (the plan's 2 bytes)


# A small model on CUDA (emulated on a CPU: tests/cuda_emulation.py counts device memory
# as torch's allocator does), under a device budget of 2,457 tokens of KV.
SMALL = dict(arch="llama", max_seq_len=4096, dim=256, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=64, hidden_dim=512, vocab_size=1000)  # fmt: skip
BUDGET = 6 << 20


def _allocated() -> int:
    import gc

    import torch

    from storage.closing import settled
    from tests.conftest import EMULATED, HAS_CUDA

    # Until a collection finds nothing: the closes a collection queues (caches of earlier
    # tests) run on the closer thread, and what they let go of is the next one's to find.
    for _ in range(10):
        found = gc.collect()
        assert settled()
        if not found:
            break
    if HAS_CUDA and not EMULATED:  # (cuBLAS keeps its workspaces in the allocator)
        torch._C._cuda_clearCublasWorkspaces()
    return torch.cuda.memory_allocated()


def _small_runtime():
    """A random `SMALL` model's runtime on CUDA with the default config, bf16, mode "auto"
    under `BUDGET` (inside `on_cuda()`)."""
    from pathlib import Path

    import torch

    from offload import Runtime
    from offload.config import RuntimeConfig
    from offload.kernels import layer as layer_kernels
    from offload.loading import LoadedModel
    from offload.model import Transformer
    from offload.model_args import ModelArgs
    from tests.conftest import EMULATED, HAS_CUDA

    a = ModelArgs(**SMALL)
    config = RuntimeConfig().replace(
        device="cuda", dtype="bfloat16", mode="auto", retrieved=128, sparse_threshold=512,
        prefill_chunk=512, device_bytes=BUDGET,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(a).fuse().to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    loaded = LoadedModel(model.to("cuda"), None, a, Path("random"), "random")
    rt = Runtime(loaded, config, torch.device("cuda"))
    if not HAS_CUDA or EMULATED:  # (Triton's interpreter: one program at a time)
        rt.model.use_ops(layer_kernels.REFERENCE)
    rt.model.rope_table(a.max_seq_len)  # (the model's, made once)
    return rt


def _prefill_and_decode(rt, num_tokens: int):
    """A cache of `rt` prefilled with `num_tokens` random ids, then 4 captured steps (the
    step's graph let go after: its memory is the activations reserve's)."""
    import torch

    from offload.generate import prefill

    ids = torch.randint(3, 1000, (num_tokens,), generator=torch.Generator().manual_seed(0))
    cache = rt.new_cache()
    cache.make_room(len(ids))  # (an empty cache past the bound moves to the tiers)
    token = int(prefill(rt.model, cache, ids.tolist(), 512).argmax())
    cache.finish_prefill()
    for _ in range(4):
        token = int(cache.decode(rt.model, token).argmax())
    # tiered: a selecting step's graph and a reusing one's (selection.reuse: on with CUDA)
    assert cache.step.captures == (1 if cache.store is None else 2)
    cache.step.close()
    return cache


def test_the_device_memory_a_tiered_cache_holds_is_what_the_plan_counts():
    """A prompt past the device budget, prefilled layer by layer, then decoded by the
    captured tiered step. What the cache then holds on the device is the plan's rows at
    that context, within their room to grow, and within `kv.device_bytes`."""
    from offload.plan import plan_for_config
    from tests.conftest import on_cuda

    with on_cuda():
        rt = _small_runtime()
        base = _allocated()
        assert rt.device_kv_tokens() < 3000
        cache = _prefill_and_decode(rt, 3000)
        assert cache.store is not None and cache.step.plan.steps == 4
        held = _allocated() - base
        rows = plan_for_config(rt.args, cache.num_tokens, 0, 0, rt.config).kv_rows_on_device
        room = rows[-1]
        assert room.what.startswith("room to grow")
        exact = sum(r.nbytes for r in rows[:-1])
        assert exact <= held <= exact + room.nbytes <= BUDGET, (exact, held, room.nbytes)
        cache.close()
        # A closed cache something still refers to holds no device memory (a runtime
        # kept after `close`: a benchmark's, whose session then loaded beside it).
        assert _allocated() == base


def test_the_device_memory_of_kv_kept_on_the_device_is_what_the_plan_counts():
    """Below the bound, "auto" keeps the whole KV on the device (`offload plan`'s
    `resident_device_bytes`, which the plan's rows, the tiered layout, are not): what the
    cache holds then is the context's KV, within twice that (its buffers double)."""
    from offload.plan import NOT_KV, plan_for_config
    from tests.conftest import on_cuda

    with on_cuda():
        rt = _small_runtime()
        base = _allocated()
        cache = _prefill_and_decode(rt, 1500)
        assert cache.store is None
        held = _allocated() - base
        p = plan_for_config(rt.args, cache.num_tokens, 0, 0, rt.config)
        kv = p.resident_device_bytes - sum(r.nbytes for r in p.rows if r.what in NOT_KV)
        assert cache.num_tokens * p.layout.token_bytes <= held <= kv, (held, kv)
        assert kv <= 2 * cache.num_tokens * p.layout.token_bytes
        cache.close()


QWEN3_8B = {
    "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "tie_word_embeddings": False,
}  # fmt: skip


def test_the_qwen3_preset_fits_a_24_gb_card_at_128k(tmp_path):
    """Qwen3-8B with its preset: YaRN gives it a 131,072-token window, and the device
    holds at most 22 GiB while decoding it tiered, at the layer-by-layer prefill's peak,
    and while all KV stays there (up to the preset's bound)."""
    from offload.config import RuntimeConfig
    from offload.plan import plan_for_config

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B))
    cfg = RuntimeConfig.from_toml("rtx4090-qwen3-8b")
    p = plan_for_config(tmp_path, 131072, 24 * GiB, 64 * GiB, cfg)
    assert p.args.max_seq_len == 131072 and p.args.qk_norm
    assert p.tier_total("device") <= 22 * GiB and p.prefill_peak_bytes <= 22 * GiB
    at_bound = plan_for_config(tmp_path, p.device_kv_tokens, 24 * GiB, 64 * GiB, cfg)
    assert p.device_kv_tokens > 32768 and at_bound.resident_device_bytes <= 22 * GiB
    r = CliRunner().invoke(main, ["plan", "-m", str(tmp_path), "-n", "131072", "--gpu-mem",
                                  "24GiB", "--host-mem", "64GiB", "-c", "rtx4090-qwen3-8b"])  # fmt: skip
    out = " ".join(r.output.split())
    assert r.exit_code == 0 and "keeps all KV on the device up to 38,967 tokens" in out, out


PHI4_MINI = {
    "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
    "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "sliding_window": 262144,
    "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48},
}  # fmt: skip


def test_the_phi4_mini_preset_fits_a_24_gb_card_at_128k(tmp_path):
    """Phi-4-mini with its preset: RoPE over 96 of each head's 128 dimensions; the device
    keeps all its KV up to 107k tokens within 22 GiB, and the tiered 128k within it too."""
    from offload.config import RuntimeConfig
    from offload.plan import plan_for_config

    (tmp_path / "config.json").write_text(json.dumps(PHI4_MINI))
    cfg = RuntimeConfig.from_toml("rtx4090-phi4-mini")
    p = plan_for_config(tmp_path, 131072, 24 * GiB, 64 * GiB, cfg)
    assert (p.args.max_seq_len, p.args.head_dim, p.args.rotary_dim) == (131072, 128, 96)
    assert p.tier_total("device") <= 22 * GiB and p.prefill_peak_bytes <= 22 * GiB
    at_bound = plan_for_config(tmp_path, p.device_kv_tokens, 24 * GiB, 64 * GiB, cfg)
    assert p.device_kv_tokens > 100_000 and at_bound.resident_device_bytes <= 22 * GiB


QWEN25_14B = {
    "model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 13824,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
}  # fmt: skip


def test_the_qwen25_14b_preset_fits_a_24_gb_card_at_128k(tmp_path):
    """Qwen2.5-14B with its preset: its dense weights (27.5 GiB) would not fit the card,
    its int4 ones take 10.6 GiB; YaRN gives it 131,072 tokens; the device holds at most
    22 GiB decoding tiered, at the layer-by-layer prefill's peak (one layer's linears
    dequantized there) and with all KV on it up to the preset's bound."""
    from offload.config import RuntimeConfig
    from offload.plan import plan_for_config

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_14B))
    cfg = RuntimeConfig.from_toml("rtx4090-qwen2.5-14b")
    p = plan_for_config(tmp_path, 131072, 24 * GiB, 64 * GiB, cfg)
    assert p.args.max_seq_len == 131072 and p.weights == "int4"
    weights = next(r for r in p.rows if r.what == "weights").nbytes
    assert 10 * GiB < weights < 11 * GiB
    assert p.tier_total("device") <= 22 * GiB and p.prefill_peak_bytes <= 22 * GiB
    at_bound = plan_for_config(tmp_path, p.device_kv_tokens, 24 * GiB, 64 * GiB, cfg)
    assert p.device_kv_tokens > 50_000 and at_bound.resident_device_bytes <= 22 * GiB
