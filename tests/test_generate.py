"""Sampling policies, incremental detokenization and the CLI on a tiny model."""

import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from offload import Runtime
from offload.generate import make_sampler, nucleus
from offload.tokenizer import StreamDecoder
from tests.conftest import DEVICE


def test_greedy_and_top_k_1_agree():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert make_sampler()(logits) == int(logits.argmax())
    assert make_sampler(temperature=1.0, top_k=1, seed=3)(logits) == int(logits.argmax())


def test_seeded_sampling_is_reproducible_and_respects_top_p():
    """On the logits' device (on a GPU, sampled there)."""
    logits = torch.tensor([5.0, 4.9, 0.0, -1.0, -2.0], device=DEVICE)
    a = make_sampler(1.0, top_p=0.9, seed=11)
    b = make_sampler(1.0, top_p=0.9, seed=11)
    seq_a = [a(logits) for _ in range(50)]
    assert seq_a == [b(logits) for _ in range(50)]
    assert set(seq_a) <= {0, 1}  # tokens 0 and 1 hold > 0.9 of the mass


def test_min_p_draws_only_tokens_at_least_min_p_times_as_likely_as_the_likeliest():
    """After the temperature (HF's order): at temperature 2 the ratios shrink, so a
    token excluded at temperature 1 is drawn."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.08], device=DEVICE))
    for temperature, min_p, want in ((1.0, 0.2, {0, 1, 2}), (1.0, 0.45, {0, 1}),
                                     (2.0, 0.45, {0, 1, 2}), (1.0, 1.0, {0}),
                                     (1.0, 0.0, {0, 1, 2, 3})):  # fmt: skip
        draw = make_sampler(temperature, seed=3, min_p=min_p)
        assert {draw(logits) for _ in range(300)} == want, (temperature, min_p)


def test_nucleus_keeps_the_tokens_a_sort_of_the_whole_vocabulary_keeps():
    """The host's top-p looks at the best 256 tokens first, then 16x more, then all,
    while their mass falls short: a peaked, a flat and a middling distribution over 5000
    tokens (the flat one needs the whole vocabulary)."""
    g = torch.Generator().manual_seed(0)
    for scale in (8.0, 0.01, 1.5):
        logits = torch.randn(5000, generator=g) * scale
        for top_p in (0.1, 0.5, 0.9, 0.99):
            probs = torch.softmax(logits, -1)
            p, order = torch.sort(probs, descending=True)
            want = set(order[p.cumsum(-1) - p < top_p].tolist())
            got = nucleus(logits.to(DEVICE), top_p).cpu()
            assert set(torch.nonzero(got > float("-inf")).flatten().tolist()) == want
            assert torch.equal(got[sorted(want)], logits[sorted(want)])


def test_stream_decoder_holds_back_split_characters(tiny_dirs):
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    tok = rt.tokenizer
    text = "seven 🎉 stones ñ 日本"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert len(ids) > len(text.split())  # the emoji really was split over byte tokens


def test_cli_generate_info_and_chat(tiny_dirs):
    model_dir = str(tiny_dirs["llama-gqa-untied"][0])
    runner = CliRunner()
    r = runner.invoke(
        main, ["generate", "-m", model_dir, "-n", "5", "--set", "dtype=float32", "seven"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["info", "-m", model_dir])
    assert r.exit_code == 0 and "kv_bytes_per_token" in r.output and "llama" in r.output
    r = runner.invoke(
        main,
        ["chat", "-m", model_dir, "-n", "4"],
        input="seven stones\n/stats\n/bogus\nmore\n/reset\n/exit\n",
    )
    assert r.exit_code == 0, r.output
    assert "prefill_tokens" in r.output and "unknown command /bogus" in r.output
    assert "conversation cleared" in r.output
    assert r.output.count("tok/s") == 2  # one figure line per answer


def test_cli_version_cut_answers_and_chat_hint(tiny_dirs):
    model_dir = str(tiny_dirs["llama-gqa-untied"][0])
    runner = CliRunner()
    r = runner.invoke(main, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("offload 0.")
    # a tiny random model rarely ends a turn within 3 tokens: the cut is said, on stderr
    r = runner.invoke(
        main, ["generate", "-m", model_dir, "-n", "3", "--set", "dtype=float32", "seven"]
    )
    assert r.exit_code == 0 and "answer cut at the token limit" in r.stderr
    assert "answer cut" not in r.stdout
    # one token: no decode rate (it is of the steps after the first), not "0.0 tok/s"
    r = runner.invoke(main, ["generate", "-m", model_dir, "-n", "1", "--set", "dtype=float32", "x"])
    assert r.exit_code == 0 and "1 generated\n" in r.stderr and "0.0 tok/s" not in r.stderr
    # cut by the model's context window (256 tokens), which a larger -n does not move
    r = runner.invoke(
        main, ["generate", "-m", model_dir, "-n", "100", "--set", "dtype=float32", "seven " * 90]
    )
    assert r.exit_code == 0, r.output
    assert "answer cut at the model's 256-token context window" in r.stderr
    r = runner.invoke(main, ["chat", "-m", model_dir, "-n", "4"], input="/bogus\n/exit\n")
    assert "(/reset /stats /save DIR /file PATH /exit)" in r.output and "[text]" in r.output


def test_cli_plan_refuses_a_context_beyond_the_window(tmp_path):
    import json

    from tests.test_plan import LLAMA31_8B

    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    args = ["plan", "-m", str(tmp_path), "--gpu-mem", "80GiB", "--host-mem", "64GiB"]
    r = CliRunner().invoke(main, [*args, "--context", "200000"])
    assert r.exit_code == 1 and "context window is 131,072 tokens" in r.output
    assert CliRunner().invoke(main, [*args, "--context", "8192"]).exit_code == 0


def test_reuse_stops_where_an_earlier_pass_began():
    from offload.conversation import KVState

    class Cache:
        num_tokens = 0

        def check_open(self):
            pass

        def truncate(self, n):
            self.num_tokens = n

    state = KVState(Cache())
    state.ids = list(range(100))  # a 70-token prompt in chunks of 32, then 30 decoded
    state.computed(0, 70, 32)
    state.computed(70, 100, 1)
    assert state.prepare(list(range(70)))[1] == 64  # the last chunk is computed again
    state.ids = list(range(100))
    state.passes = [(0, 70, 32), (70, 100, 1)]
    assert state.prepare(list(range(90)) + [7])[1] == 90  # decoded tokens: any position
    state.ids = list(range(100))
    state.passes = [(0, 70, 32), (70, 100, 1)]
    assert state.prepare(list(range(100)) + [5])[1] == 100  # all of it: always exact


def test_same_greedy_request_gives_the_same_tokens_with_and_without_reuse(smol_bf16):
    rt = Runtime(smol_bf16.loaded, smol_bf16.config, smol_bf16.device)
    for prompt in ("Write a haiku about rain.", "Name three colors."):
        fresh = Runtime(rt.loaded, rt.config, rt.device).generate(prompt, max_new_tokens=24)
        again = [rt.generate(prompt, max_new_tokens=24) for _ in range(3)]
        assert again == [fresh] * 3, prompt
    # and a chat turn reuses the earlier turns up to the last decoded token
    conv = rt.chat()
    conv.send("Tell me about the river Nile.", max_new_tokens=16)
    conv.send("How long is it?", max_new_tokens=8)
    s = rt.stats()
    assert s["reused_tokens"] >= s["prompt_tokens"] - 20


def test_a_chat_interrupted_inside_its_first_prefill_answers_as_a_fresh_one(tiny_dirs):
    """Ctrl-C during the first turn's prefill (a long paste) stops inside the model, with
    the first layer's KV written and the cache counting none: the next turns answer as in
    a chat that was never interrupted (the stale KV once stayed and spoiled them all)."""
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    want = rt.chat().send("ab cd", max_new_tokens=4, temperature=0)
    conv = rt.chat()
    layer = rt.model.layers[1]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    layer.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        conv.send("a long pasted text " * 8, max_new_tokens=4)
    del layer.forward
    assert conv.context_tokens == 0 and conv.messages == []
    assert conv.send("ab cd", max_new_tokens=4, temperature=0) == want


@pytest.mark.parametrize("stop", ["close", "interrupt"])
def test_a_stopped_answer_stays_in_the_chat_as_far_as_it_got(tiny_dirs, stop, monkeypatch):
    """Ctrl-C after some tokens of an answer (the command line closes the stream between
    steps; an interrupt may also come inside one): the answer so far stays in the
    conversation, as on the screen, and the next turn answers as one whose history held
    it from the start. (Stopped in its prefill, the turn is not kept: the test above.)"""
    from offload.kvcache import KVCache

    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    conv = rt.chat(system="sys")
    steps = conv.stream("ab cd ef", max_new_tokens=12, temperature=0)
    said = [next(steps).text for _ in range(5)]
    if stop == "close":
        steps.close()
    else:  # inside the next step (its decode: a replayed graph on CUDA, so not a layer)

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(KVCache, "decode", interrupted)
            with pytest.raises(KeyboardInterrupt):
                next(steps)
    assert conv.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab cd ef"},
        {"role": "assistant", "content": "".join(said)},
    ]
    after = conv.send("gh ij", max_new_tokens=6, temperature=0)
    fresh = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32")
    resumed = fresh.chat(system="sys")
    resumed.messages = list(conv.messages[:3])
    assert resumed.send("gh ij", max_new_tokens=6, temperature=0) == after


@pytest.mark.parametrize("mode", ["auto", "sparse"])
def test_an_answer_stopped_inside_a_step_keeps_the_document(tiny_dirs, mode):
    """Ctrl-C inside a decode step of an answer about a loaded document: the document's KV
    (and what of the question was done) stays, the selection index is rebuilt from it
    by the next question, whose answer is a fresh runtime's."""
    over = {"mode": mode, "sink": 4, "window": 32, "retrieved": 16, "index_refresh": 64,
            "dense_layers": 1, "sparse_threshold": 64}  # fmt: skip
    doc = " ".join(f"w{i % 37}" for i in range(40))

    def loaded():
        rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32", **over)
        rt.load_document(doc)
        return rt

    want = loaded().ask("w3 w4?", max_new_tokens=4, temperature=0)
    rt = loaded()
    doc_tokens = rt.stats()["context_tokens"]
    layer, calls = rt.model.layers[1], []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the question's prefill, one step, then inside the next
            raise KeyboardInterrupt
        return type(layer).forward(layer, *args, **kwargs)

    layer.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        rt.ask("w1 w2?", max_new_tokens=8, temperature=0)
    del layer.forward
    assert rt._state.cache.num_tokens > doc_tokens  # the document and the question kept
    policy = rt._state.cache.policy
    assert not (policy is not None and any(policy.indexed))  # dropped
    assert rt.ask("w3 w4?", max_new_tokens=4, temperature=0) == want
    assert (mode == "sparse") == (policy is not None and any(policy.indexed))  # rebuilt
    assert rt.stats()["prefill_tokens"] < 20  # the question only


@pytest.mark.parametrize("mode", ["auto", "sparse"])
def test_questions_after_another_request_reuse_the_whole_document(tiny_dirs, mode):
    """A `generate` between questions takes the cache from the document: the next
    question reads the document again, as passes of its own (and its index), so that it
    answers as after `load_document` and the questions after it prefill only themselves.
    Before, each of them prefilled all of the document that followed the last chunk
    start, every time."""
    over = {"mode": mode, "sink": 4, "window": 32, "retrieved": 16, "index_refresh": 64,
            "dense_layers": 1, "sparse_threshold": 64}  # fmt: skip
    doc = " ".join(f"w{i % 37}" for i in range(50))
    rt = Runtime.from_pretrained(tiny_dirs["llama-gqa-untied"][0], dtype="float32",
                                 prefill_chunk=64, **over)  # fmt: skip
    rt.load_document(doc)
    doc_tokens = rt.stats()["context_tokens"]
    ask = dict(max_new_tokens=4, temperature=0)
    want = [rt.ask(q, **ask) for q in ("w3 w4?", "w5 w6?")]
    rt.generate("ab cd", **ask)
    assert rt.ask("w3 w4?", **ask) == want[0]
    assert rt.stats()["prefill_tokens"] > doc_tokens  # (the document read again)
    assert rt.ask("w5 w6?", **ask) == want[1]
    assert rt.stats()["reused_tokens"] >= doc_tokens and rt.stats()["prefill_tokens"] < 20


def test_requests_with_one_system_prompt_reuse_it_and_answer_as_fresh(tiny_dirs):
    """A server's requests: the same long system message, another user message each time.
    Its KV is prefilled as passes of its own, so each later request prefills only its
    own message; and the passes break where the prompt says, so each answer is a fresh
    runtime's. Before, the whole prompt was prefilled again each time (a prompt within a
    prefill chunk reuses nothing but from where a pass began)."""
    directory = tiny_dirs["llama-gqa-untied"][0]
    system = {"role": "system", "content": " ".join(f"w{i % 37}" for i in range(40))}
    ask = dict(max_new_tokens=4, temperature=0)
    rt = Runtime.from_pretrained(directory, dtype="float32")
    own = len(rt.tokenizer.apply_chat_template([system], False, True))
    for n, question in enumerate(("w3 w4?", "w5 w6?", "w7?")):
        prompt = [system, {"role": "user", "content": question}]
        fresh = Runtime.from_pretrained(directory, dtype="float32")
        assert rt.generate(prompt, **ask) == fresh.generate(prompt, **ask)
        if n:
            assert rt.stats()["reused_tokens"] == own, (own, rt.stats()["reused_tokens"])
