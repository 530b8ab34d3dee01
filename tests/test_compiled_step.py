"""The decode step through torch.compile (`model.compile_step`): the same tokens as the
step it compiles, each kind of block compiled once, however the buffers grow (on a CPU
with Inductor's C++ backend and the step run eagerly; on CUDA with Triton and the graph
captured). The compiled code is shared by the process (torch.compile caches it per
function), so a test counts the compiles its own steps add."""

import pytest
import torch
from torch._dynamo.utils import counters

from offload import Runtime
from offload.backend import Backend
from offload.generate import prefill
from offload.graphs import run_block
from tests.conftest import DEVICE, cuda_only
from tests.test_decode_step import _greedy
from tests.test_tiered_step import _tiered_pair

CUDA = DEVICE.type == "cuda"


def _backend(compile: bool) -> Backend:
    return Backend(DEVICE, kernels=True, fixed_shape=True, graphs=CUDA, remote_host=True,
                   compile=compile)  # fmt: skip


def _compiled_ops(rt) -> None:
    """The model's layer operations as a runtime with `compile_step` runs them (torch's,
    which Inductor fuses: the Triton kernels are not traced), for both steps compared."""
    rt.model.use_ops(_backend(True).layer_ops)


def _graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_dense_step_equals_the_step_and_compiles_once(tiny_dirs):
    rt = Runtime.from_pretrained(
        tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full", device=DEVICE.type
    )
    _compiled_ops(rt)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 3)
    plain, compiled = rt.new_cache(), rt.new_cache()
    plain.use_step(rt.model, _backend(False))
    compiled.use_step(rt.model, _backend(True))
    logits = [prefill(rt.model, c, ids, 8) for c in (plain, compiled)]
    tokens = [_greedy(c, rt.model, lg, 4) for c, lg in zip((plain, compiled), logits, strict=True)]
    capacity, compiles = compiled.layers[0].capacity, _graphs_compiled()
    more = [_greedy(c, rt.model, c.decode(rt.model, 3), 90) for c in (plain, compiled)]
    assert tokens[0] == tokens[1] and more[0] == more[1]
    assert compiled.layers[0].capacity > capacity  # the buffers grew meanwhile
    assert _graphs_compiled() == compiles  # ... and nothing was compiled again


@pytest.mark.parametrize("hit_factor, reuse", [(None, "off"), (2.0, "on")])
def test_compiled_tiered_step_equals_the_step_and_compiles_once(tiny_dirs, hit_factor, reuse):
    """Through hand-overs to the store, index updates and growing buffers; the kernels
    (as torch operators) inside the compiled graph. Both layers sparse: they share one
    compile (with `selection.reuse`, one for each of the step's two kinds). (Hit caches
    without reuse: their selecting steps are every other step of the second case; a case
    of its own took a minute of the suite.)"""
    rt, plain, compiled = _tiered_pair(
        tiny_dirs, hit_factor, index_refresh=16, dense_layers=0, reuse=reuse
    )
    _compiled_ops(rt)
    for cache, compile in ((plain, False), (compiled, True)):
        cache.mirror_dense_layers(DEVICE)
        cache.use_step(rt.model, _backend(compile), hit_factor)
    # (72 tokens: the index's buffers, made for 1.25 x the prompt, grow some 20 steps on)
    ids = rt.tokenizer.encode("seven quiet stones over the river " * 10)[:72]
    logits = []
    for c in (plain, compiled):
        logits.append(prefill(rt.model, c, ids, 64))
        c.finish_prefill()
    before = _graphs_compiled()
    tokens = [_greedy(c, rt.model, lg, 4) for c, lg in zip((plain, compiled), logits, strict=True)]
    compiles = _graphs_compiled()
    # one for both sparse blocks (a reusing step's: another), unless compiled before
    assert compiles - before <= 1 + (reuse == "on")
    capacity = compiled.step.plan.indexes[1].token_capacity
    more = [_greedy(c, rt.model, c.decode(rt.model, 3), 26) for c in (plain, compiled)]
    assert tokens[0] == tokens[1] and more[0] == more[1] and compiled.step.plan.steps == 31
    assert compiled.step.plan.indexes[1].token_capacity > capacity  # buffers grew
    assert _graphs_compiled() == compiles  # ... and nothing was compiled again


def test_a_step_that_fails_to_compile_decodes_as_written(tiny_dirs):
    """A compiler that fails (here a backend that raises) costs a warning, not the decode."""
    rt = Runtime.from_pretrained(
        tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full", device=DEVICE.type
    )
    ids = rt.tokenizer.encode("seven quiet stones over the river")
    plain, broken = rt.new_cache(), rt.new_cache()
    plain.use_step(rt.model, _backend(False))
    broken.use_step(rt.model, _backend(True))

    def no_compiler(graph, inputs):
        raise RuntimeError("no compiler here")

    step = broken.step
    step._block = torch.compile(run_block, backend=no_compiler)  # as `compile_step` would
    logits = [prefill(rt.model, c, ids, 8) for c in (plain, broken)]
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        tokens = [
            _greedy(c, rt.model, lg, 8) for c, lg in zip((plain, broken), logits, strict=True)
        ]
    assert tokens[0] == tokens[1] and step._block is None


@cuda_only
def test_compiled_step_replays_without_host_syncs(tiny_dirs):
    from tests.test_decode_step import _decode_without_syncs

    rt = Runtime.from_pretrained(
        tiny_dirs["llama-gqa-untied"][0], dtype="float32", mode="full", compile_step=True
    )
    cache = rt.new_cache()
    assert cache.step is not None and cache.step._block is not None
    logits = prefill(rt.model, cache, rt.tokenizer.encode("seven quiet stones " * 3), 8)
    _greedy(cache, rt.model, logits, 4)  # compiled and captured
    captures = cache.step.captures
    _decode_without_syncs(cache, rt.model, (3, 4, 5))
    assert cache.step.captures == captures and cache.step._block is not None


def test_kernel_operators_pass_torchs_operator_checks():
    """Each Triton kernel as the compiled step calls it (offload/kernels/ops.py), through
    `torch.library.opcheck`: its schema (what it mutates), its fake implementation (the
    shapes and dtypes Inductor plans with) and its trace with symbolic sizes."""
    from offload.kernels import ops
    from storage.quant import quantize_keys

    g = torch.Generator().manual_seed(0)
    H, T, D, N, k, M, C = 2, 256, 64, 64, 8, 16, 16

    def ints(high, *shape, dtype=torch.long):
        return torch.randint(0, high, shape, generator=g, dtype=dtype).to(DEVICE)

    qk = quantize_keys(torch.randn(H, T, D, generator=g), 2, C)
    codes, scale, zero = (t.to(DEVICE) for t in (qk.codes, qk.scale, qk.zero))
    q = torch.randn(H, 3, D, generator=g).to(DEVICE, torch.bfloat16)
    kv = torch.randn(2, H, T, D, generator=g).to(DEVICE)
    slab = torch.randn(2, H, T // C, C, D, generator=g).to(DEVICE)
    table = torch.arange(T // C, device=DEVICE)
    sel = torch.stack([torch.randperm(T, generator=g)[:k] for _ in range(H)]).to(DEVICE)
    victims = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(H)]).to(DEVICE)
    one = torch.ones(1, dtype=torch.long, device=DEVICE)
    scores = torch.randn(H, 17, generator=g).to(DEVICE)

    def tables():  # a hit cache's (fresh for each check: they are mutated)
        return (torch.full((H, T + 1), -1, dtype=torch.int32, device=DEVICE),
                torch.full((H, M + 1), -1, device=DEVICE), torch.full((H, M + 1), -1, device=DEVICE))  # fmt: skip

    slot_of, token_of, used = tables()
    checks = [
        (ops.decode_attention, (q.float(), kv[0], kv[1], torch.tensor([200], device=DEVICE))),
        (ops.decode_attention, (q.float(), kv[0], kv[1], one, kv[0], kv[1], one + 3, sel)),
        (ops.gather_kv, (slab, table, sel)),
        (ops.fetch_into, (slab, table, sel, sel > T // 2, victims, torch.zeros(2, H, M, D, device=DEVICE))),
        (ops._rerank_weights, (q, codes, scale, zero, ints(T, H, N), torch.tensor([N, 40], device=DEVICE), 2, C, D**-0.5)),
        (ops.score_clusters, (q, kv[0, :, :17], torch.zeros(H, 17, device=DEVICE))),
        (ops.take_clusters, (scores, ints(9, H, 18).float()[:, :-1], 8, 2, one)),
        (ops.take_clusters, (scores, ints(9, H, 17).float(), 8, 2, None)),
        (ops.top_ids, (scores, ints(T, H, 17), 5, one)),
        (ops.top_ids, (scores, ints(T, H, 17), 5, None)),
        (ops.cluster_candidates, ((torch.rand(H, 17, generator=g) < 0.5).to(DEVICE), ints(17, H, T, dtype=torch.int32), 4, torch.tensor([200], device=DEVICE), N)),
        (ops.lookup, (sel, torch.tensor([k], device=DEVICE), slot_of, token_of, used, torch.zeros(H, dtype=torch.long, device=DEVICE), torch.zeros(2, dtype=torch.long, device=DEVICE))),
    ]  # fmt: skip
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))  # fmt: skip
