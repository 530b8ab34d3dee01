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


# Three facts at three depths of one 8k document, each with its question and the start of
# its answer (depth, fact, question, answer begun, what the answer names).
FACTS = (
    (0.1, NEEDLE, QUESTION, "The secret passphrase is", "purple elephant"),
    (0.5, "The name of the captain's dog is Biscuit. ", "What is the name of the captain's dog?",
     "The name of the captain's dog is", "biscuit"),
    (0.9, "The train to the coast leaves from Lisbon. ",
     "Where does the train to the coast leave from?", "The train to the coast leaves from",
     "lisbon"),
)  # fmt: skip


def test_needles_at_8k_cluster_at_5_percent_agrees_with_dense(smol_bf16):
    """Wherever dense attention finds a fact in an 8k document, sparse (cluster, 5% + sink +
    window) does too, with the same answer. Dense finds the three facts here (measured;
    which ones depends on rounding, so on the thread count and the device): what the code
    guarantees is the agreement, asserted on at least 2 of 3 depths.

    One document, its three questions asked in turn (an 8k prefill takes about 40 s on a
    2-core CPU without fast bf16: the later questions reuse the document's KV up to where
    a prefill pass began, and the index with it). Both decode from the same prefill,
    whose logits gave both their first token: after the sparse answer the cache is cut
    back to the prompt and the first token, with the selection mode set to dense, decodes
    the rest attending to every token; the next question then runs sparse again."""
    repeats, body, done = 320, "", 0
    for depth, fact, *_ in FACTS:
        body += FILL * (int(repeats * depth) - done) + fact
        done = int(repeats * depth)
    doc = "Read the text below.\n\n" + body + FILL * (repeats - done) + "\n"
    sparse = fresh(smol_bf16, mode="sparse", selector="cluster", retrieve_fraction=0.05)
    dense_hits = 0
    for i, (depth, _, question, begun, named) in enumerate(FACTS):
        messages = [{"role": "user", "content": doc + question},
                    {"role": "assistant", "content": begun}]  # fmt: skip
        got = [step.token_id for step in sparse.stream(messages, max_new_tokens=3)]
        s = sparse.stats()
        assert 7500 <= s["prompt_tokens"] <= 8192
        assert (s["reused_tokens"] > 4000) == (i > 0)  # (the document's first passes)
        assert s["budget"]["retrieved"] <= 0.05 * s["context_tokens"] + 1
        assert s["selection"]["sparse_layer_steps"] > 0
        cache = sparse._state.cache
        cache.truncate(s["prompt_tokens"])
        sparse_mode = cache.policy.selection
        cache.policy.selection = dataclasses.replace(sparse_mode, mode="dense")
        steps = generate_steps(sparse.model, cache, sparse.tokenizer, got[:1], 2, make_sampler())
        want = got[:1] + [step.token_id for step in steps][: len(got) - 1]
        assert cache.policy.stats.sparse_steps == s["selection"]["sparse_layer_steps"]
        cache.policy.selection = sparse_mode
        if named in smol_bf16.tokenizer.decode(want).lower():
            dense_hits += 1
            assert got == want, (depth, want, got)
    sparse.close()
    assert dense_hits >= 2
