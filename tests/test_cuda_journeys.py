"""What a user does with a runtime on CUDA (emulated on a CPU: tests/cuda_emulation.py),
end to end through the public API, gives the tokens the CPU's dense cache gives.

At full retrieval budget (every far token retrieved) sparse decode is dense, so the
fixed-shape steps, their captured graphs, the move to the tiers, the layer-by-layer
prefill, the hit caches and the sessions must all leave the answers as they are. The
tiny model is float32 and random: its text is gibberish, compared token for token.
"""

import pytest

from offload import Runtime, attention
from tests.conftest import filler_text, on_cuda


def journey(make, where) -> list:
    """A chat of three turns, saved and resumed for a fourth; a document, asked twice,
    saved, loaded and asked again. Each answer in order."""
    answers = []
    conv = make().chat(system="Be brief.")
    for seed, words in ((5, 6), (6, 8), (7, 10)):
        answers.append(conv.send(filler_text(words, seed=seed), max_new_tokens=8))
    conv.save(where / "chat")
    resumed = Runtime.load_session(where / "chat", model=make())
    answers.append(resumed.resume_chat().send(filler_text(5, seed=9), max_new_tokens=8))
    rt = make()
    rt.load_document(filler_text(40, seed=11))
    answers += [rt.ask(q, max_new_tokens=8) for q in ("seven stones?", "green river?")]
    rt.save_session(where / "doc")
    loaded = Runtime.load_session(where / "doc", model=make())
    answers.append(loaded.ask("paper window?", max_new_tokens=8))
    return answers


@pytest.fixture(scope="module")
def dense_answers(tiny_dirs, tmp_path_factory):
    path = tiny_dirs["llama-gqa-untied"][0]
    cpu = Runtime.from_pretrained(path, dtype="float32", mode="full", device="cpu")
    return journey(
        lambda: Runtime(cpu.loaded, cpu.config, cpu.device), tmp_path_factory.mktemp("c")
    )


@pytest.mark.parametrize(
    "mode,prefetch,budget_tokens",
    [
        ("auto", "off", 120),  # the device cache, moved to the tiers by the second turn
        ("sparse", "auto", 450),  # tiered from the start: hit caches (3x), speculative prefetch
    ],
)
def test_a_users_journey_on_cuda_answers_as_the_cpus_dense_cache(
    tiny_dirs, tmp_path, dense_answers, mode, prefetch, budget_tokens, monkeypatch
):
    path = tiny_dirs["llama-gqa-untied"][0]
    # a loaded session's dense layer is read onto the device in blocks of this many
    # tokens: here several, across chunk boundaries
    monkeypatch.setattr(attention, "MIRROR_BLOCK", 40)
    with on_cuda():
        rt = Runtime.from_pretrained(path, dtype="float32", device="cuda", mode=mode,
                                     prefetch=prefetch, sink=4, window=16, dense_layers=1,
                                     retrieved=100_000, sparse_threshold=32,
                                     candidate_factor=2)  # fmt: skip
        L = rt.layout
        cfg = rt.config.replace(
            device_bytes=budget_tokens * (L.token_bytes + L.token_bytes_per_layer)
        )
        made = []

        def make():
            made.append(Runtime(rt.loaded, cfg, rt.device))
            return made[-1]

        assert journey(make, tmp_path) == dense_answers
        caches = [r._state.cache for r in made] + [r._last_state.cache for r in made]
        assert any(c.store is not None and c.step is not None and c.step.plan.steps for c in caches)
        if mode == "auto":
            assert made[0].device_kv_tokens() == budget_tokens
