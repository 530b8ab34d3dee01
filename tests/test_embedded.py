"""End to end on the embedded SmolLM2-135M GGUF (the real model)."""

import pytest
import torch

from offload.generate import StepResult
from tests.conftest import embedded_gguf_path

FILL = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The secret passphrase is purple elephant. "

TOKENIZER_CASES = [
    "Hello world",
    "Numbers: 12345 and 3.14159, 1,000,000 and 2026-11-22",
    "  leading spaces\tand\ttabs\n\n\nnewlines   trailing  ",
    "unicode: héllo wörld ñ 日本語のテキスト 🎉🚀 Ωμέγα",
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x**2  # comment\n",
    "MiXeD CaSe, punctuation!?;:'\"()[]{} and URLs https://example.com/a?b=c",
    "",
]


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers loading the same GGUF file: tokenizer and fp32 model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return tok, model.eval()


def test_gguf_logits_match_transformers(smol_fp32, hf_gguf):
    _, model = hf_gguf
    ids = smol_fp32.encode_prompt("Explain why the sky is blue, in two sentences.")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = smol_fp32.logits(ids)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_tokenizer_ids_match_transformers(smol_fp32, hf_gguf, text):
    tok, _ = hf_gguf
    assert smol_fp32.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False)
    assert smol_fp32.tokenizer.decode(smol_fp32.tokenizer.encode(text)) == text


def test_chat_template_matches_transformers(smol_fp32, hf_gguf):
    tok, _ = hf_gguf
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]
    ours = smol_fp32.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert 2 in smol_fp32.tokenizer.stop_ids  # <|im_end|>


def test_needle_in_2k_tokens(smol_fp32):
    """In float32 with the file's weights dequantized, so that the answer does not hang on
    one device's bf16 rounding (the 135M model misses this needle in bf16 on a GPU)."""
    doc = FILL * 47 + NEEDLE + FILL * 47
    answer = smol_fp32.generate(doc + "\nWhat is the secret passphrase?", max_new_tokens=12)
    s = smol_fp32.stats()
    assert 2000 <= s["prompt_tokens"] <= 8192
    assert "purple elephant" in answer.lower()
    assert s["prefill_tokens"] == s["prompt_tokens"] and s["decode_tokens"] >= 1


def test_second_chat_turn_prefills_only_its_own_tokens(smol_bf16):
    conv = smol_bf16.chat(system="You are a concise assistant.")
    first = conv.send("Name one planet.", max_new_tokens=24)
    assert first
    after_first = conv.context_tokens
    conv.send("Name another one.", max_new_tokens=8)
    s = smol_bf16.stats()
    full = smol_bf16.encode_prompt(conv.messages[:-1])  # the prompt of the second turn
    assert s["prompt_tokens"] == len(full)
    assert s["reused_tokens"] == after_first
    # What was prefilled: the previous answer's end-of-turn token plus the new turn.
    assert s["prefill_tokens"] == len(full) - after_first
    assert s["prefill_tokens"] < 20


def test_stream_steps_and_utf8(smol_bf16):
    steps = list(
        smol_bf16.stream("Reply with three different emoji and nothing else.", max_new_tokens=20)
    )
    assert all(isinstance(s, StepResult) for s in steps)
    assert [s.index for s in steps] == list(range(len(steps)))
    assert steps[-1].finish_reason in ("stop", "length")
    assert all(s.finish_reason is None for s in steps[:-1])
    text = "".join(s.text for s in steps)
    assert "\ufffd" not in text
    ids = [s.token_id for s in steps if s.finish_reason != "stop"]
    # The text is the decoded ids, less a character the length limit cut in half.
    assert text == smol_bf16.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_dense_generation_spilling_to_disk_equals_in_memory(smol_bf16, tmp_path):
    from offload import Runtime

    doc = FILL * 47 + NEEDLE + FILL * 47 + "\nWhat is the secret passphrase?"
    # A fresh runtime on the same weights: both prefill the whole prompt in the same chunks
    # (bf16 logits depend on how the prefill was chunked, so no reuse of earlier tests' KV).
    # In memory: the tiers with room for everything (on every device the same code
    # path as the spilling one, so bf16 rounding cannot tell them apart).
    full = Runtime(smol_bf16.loaded, smol_bf16.config.replace(mode="dense"), smol_bf16.device)
    want = [s.token_id for s in full.stream(doc, max_new_tokens=10)]
    chunk_bytes = smol_bf16.layout.chunk_bytes
    cfg = smol_bf16.config.replace(
        mode="dense", host_bytes=64 * chunk_bytes, disk_dir=str(tmp_path), spill_batch=16
    )
    tiered = Runtime(smol_bf16.loaded, cfg, smol_bf16.device)
    got = [s.token_id for s in tiered.stream(doc, max_new_tokens=10)]
    s = tiered.stats()
    assert got == want
    assert s["tier_reads"]["disk"] > 0 and s["spilled_chunks"] > 0
    # The host's chunks within the budget; beside them, where the device is not the host
    # (CUDA), the chunks' abstracts wait in host memory (read by the chunk selector only).
    store = tiered._last_state.cache.store
    abstracts = 0 if store.abstracts_on_device else store.layout.abstracts_bytes(store.num_tokens)
    assert s["kv_bytes"]["host"] - abstracts <= 64 * chunk_bytes
    # The disk holds at least every chunk that is not on the host.
    chunks = 30 * (s["context_tokens"] // 16)
    assert s["kv_bytes"]["disk"] >= (chunks - 64) * chunk_bytes


def test_int4_weights_are_the_files_own_q4_1_codes(smol_fp32):
    """Re-quantizing a dequantized Q4_1 block gives back the file's codes, so the default
    int4 linears run the GGUF at its stored precision."""
    import numpy as np
    from gguf import GGUFReader

    from offload.quantize import int4_codes

    tensor = next(
        t for t in GGUFReader(embedded_gguf_path()).tensors if t.name == "blk.0.ffn_up.weight"
    )
    assert tensor.tensor_type.name == "Q4_1"
    blocks = np.asarray(tensor.data).view(np.uint8).reshape(-1, 20)  # fp16 d, fp16 m, 16 B
    nibbles = blocks[:, 4:]
    stored = np.concatenate([nibbles & 15, nibbles >> 4], axis=1)  # first 16, last 16
    gate_up = smol_fp32.model.layers[0].feed_forward.w13.weight  # [gate; up], fused at load
    ours, _, _ = int4_codes(gate_up[gate_up.shape[0] // 2 :])
    assert np.array_equal(ours.numpy().reshape(-1, 32), stored)


def test_default_weights_are_int4_and_agree_with_dense(smol_cpu, smol_fp32):
    from offload.quantize import Int4Linear

    assert smol_cpu.model.weights == "int4"
    assert isinstance(smol_cpu.model.layers[0].feed_forward.w13, Int4Linear)
    ids = smol_cpu.encode_prompt("Name the capital of France.")
    a = smol_cpu.logits(ids)[-1]
    b = smol_fp32.logits(ids)[-1]
    assert int(a.argmax()) == int(b.argmax())
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
    # Prefill chunks multiply the weight dequantized from the codes: the file's, exactly.
    for name in ("w13", "w2"):
        packed = getattr(smol_cpu.model.layers[3].feed_forward, name)
        dense = getattr(smol_fp32.model.layers[3].feed_forward, name).weight
        assert torch.equal(packed.dequantized(torch.float32), dense.detach())
