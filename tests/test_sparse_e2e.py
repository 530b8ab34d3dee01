"""Sparse decode on the embedded model."""

import dataclasses

import pytest

from offload import Runtime
from offload.generate import generate_steps, make_sampler

FILL = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The secret passphrase is purple elephant. "
QUESTION = "What is the secret passphrase?"


def needle_messages(repeats: int, depth: float):
    k = int(repeats * depth)
    doc = (
        f"{QUESTION} Read the text below.\n\n"
        + FILL * k
        + NEEDLE
        + FILL * (repeats - k)
        + "\n"
        + QUESTION
    )
    # Priming the answer helps a 135M model (the final assistant message is continued).
    return [
        {"role": "user", "content": doc},
        {"role": "assistant", "content": "The secret passphrase is"},
    ]


def fresh(rt, **overrides):
    return Runtime(rt.loaded, rt.config.replace(**overrides), rt.device)


@pytest.mark.parametrize("selector", ["exact", "summary", "chunk", "cluster"])
def test_full_budget_sparse_equals_dense(smol_bf16, selector):
    prompt = needle_messages(14, 0.5)
    dense = fresh(smol_bf16, mode="full")
    want = [s.token_id for s in dense.stream(prompt, max_new_tokens=8)]
    sparse = fresh(smol_bf16, mode="sparse", selector=selector, retrieved=100_000)
    got = [s.token_id for s in sparse.stream(prompt, max_new_tokens=8)]
    st = sparse.stats()
    assert st["selection"]["sparse_layer_steps"] == 28 * (len(got) - 1)  # 30 layers less 2 dense
    assert st["selection"]["dense_layer_steps"] == 2 * (len(got) - 1)
    assert got == want
    sparse.close()


def test_needle_at_8k_cluster_at_5_percent_agrees_with_dense(smol_bf16):
    """Wherever dense attention finds the needle, sparse (cluster, 5% + sink + window) does too,
    with the same answer. Dense finds it at 4 or 5 of 5 depths with this prompt (measured;
    which ones depends on rounding, so on the thread count and the device): what the code
    guarantees is the agreement, asserted on at least 2 of 3 depths (an 8k prefill takes
    about a minute on a 2-core CPU without fast bf16).

    Both decode from the same prefill, whose logits gave both their first token: after
    the sparse answer the cache is cut back to the prompt and the first token, with the
    selection mode set to dense, decodes the rest attending to every token."""
    dense_hits = 0
    for depth in (0.1, 0.5, 0.9):
        prompt = needle_messages(320, depth)
        sparse = fresh(smol_bf16, mode="sparse", selector="cluster", retrieve_fraction=0.05)
        got = [step.token_id for step in sparse.stream(prompt, max_new_tokens=3)]
        s = sparse.stats()
        assert 7500 <= s["prompt_tokens"] <= 8192
        assert s["budget"]["retrieved"] <= 0.05 * s["context_tokens"] + 1
        assert s["selection"]["sparse_layer_steps"] > 0
        cache = sparse._state.cache
        cache.truncate(s["prompt_tokens"])
        cache.policy.selection = dataclasses.replace(cache.policy.selection, mode="dense")
        steps = generate_steps(sparse.model, cache, sparse.tokenizer, got[:1], 2, make_sampler())
        want = got[:1] + [step.token_id for step in steps][: len(got) - 1]
        assert cache.policy.stats.sparse_steps == s["selection"]["sparse_layer_steps"]
        sparse.close()
        if "purple elephant" in smol_bf16.tokenizer.decode(want):
            dense_hits += 1
            assert got == want, (depth, want, got)
    assert dense_hits >= 2
