"""Models beyond Llama: Qwen3 and the RoPE scalings (yarn, linear) against transformers,
from config.json, from GGUF metadata, and set by `model.rope_scaling` over a model's own;
GGUF tokenizers' pre-tokenizers (Mistral Nemo's tekken)."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from offload import Runtime
from offload.errors import ConfigError
from storage.errors import SessionError
from tests.conftest import logits_tolerance


def random_ids(n, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def write_qwen_gguf(directory, ref_model, path, rope: dict | None, window: int = 0):
    """The tiny HF qwen3, phi3 or smollm3 model `ref_model` (saved in `directory`) as a
    float32 GGUF, its tokenizer's vocabulary and merges, and `rope` as
    `ARCH.rope.scaling.*` keys (qwen and phi3 files keep HF's Q/K row order, smollm3's
    are permuted as llama's), or for phi3 its LongRoPE factors as llama.cpp's converter
    writes them (tensors, and the original context)."""

    import gguf

    cfg = ref_model.config
    arch = cfg.model_type
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tok = json.loads((directory / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"]) | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if arch == "phi3":  # as llama.cpp's converter: RoPE's dimensions, no key length
        rotary = cfg.rope_parameters.get("partial_rotary_factor", 1.0)
        w.add_rope_dimension_count(int(head_dim * rotary))
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if window:
        w.add_sliding_window(window)
    longrope = cfg.rope_parameters if arch == "phi3" else None
    if longrope:
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        for which in ("long", "short"):
            factors = np.array(longrope[f"{which}_factor"], dtype=np.float32)
            w.add_tensor(f"rope_factors_{which}.weight", factors)
    if rope:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope["type"]))
        w.add_rope_scaling_factor(rope["factor"])
        if "original_context_length" in rope:
            w.add_rope_scaling_orig_ctx_len(rope["original_context_length"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "q_proj": "attn_q",
             "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "gate_proj": "ffn_gate",
             "up_proj": "ffn_up", "down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "qkv_proj": "attn_qkv",
             "gate_up_proj": "ffn_up", "lm_head": "output"}  # fmt: skip
    for name, t in ref_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: the file has no output matrix
        parts = name.removeprefix("model.").removesuffix(".weight").split(".")
        gguf_name = (
            f"blk.{parts[1]}.{names[parts[-1]]}.weight" if parts[0] == "layers"
            else f"{names[parts[0]]}.weight"
        )  # fmt: skip
        t = t.float().numpy()
        if arch == "smollm3" and parts[-1] in ("q_proj", "k_proj"):  # as llama.cpp permutes
            heads = cfg.num_attention_heads if parts[-1] == "q_proj" else cfg.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(gguf_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_qwen3_gguf_with_yarn_matches_transformers(tiny_dirs, tmp_path):
    """Qwen3's q/k norms and YaRN read from a GGUF file (`qwen3.rope.scaling.*`), and
    again from the converted file's cache, give transformers' logits."""
    directory, ref_model = tiny_dirs["qwen3-qknorm-yarn"]
    rope = {"type": "yarn", "factor": 4.0, "original_context_length": 24}
    src = write_qwen_gguf(directory, ref_model, tmp_path / "q.gguf", rope)
    ids = random_ids(90)
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    for _ in range(2):  # converted, then from the cache
        rt = Runtime.from_pretrained(src, dtype="float32", device="cpu")
        s = rt.args.rope_scaling
        assert rt.args.qk_norm and (s.kind, s.factor, s.original_max_position) == ("yarn", 4, 24)
        torch.testing.assert_close(rt.logits(ids), ref, **logits_tolerance("qwen3-qknorm-yarn"))
    assert rt.tokenizer.encode("seven quiet stones") == Runtime.from_pretrained(
        directory, dtype="float32", device="cpu"
    ).tokenizer.encode("seven quiet stones")
    # a linear scaling without its original context: the file's context is the stretched one
    linear = write_qwen_gguf(
        directory, ref_model, tmp_path / "l.gguf", {"type": "linear", "factor": 2}
    )
    a = Runtime.from_pretrained(linear, dtype="float32", device="cpu").args
    assert (a.rope_scaling.kind, a.rope_scaling.original_max_position, a.max_seq_len) == (
        "linear",
        128,
        256,
    )


def test_a_phi3_gguf_matches_transformers(tiny_dirs, tmp_path):
    """Phi-3's GGUF layout (q, k, v in one matrix, gate and up in `ffn_up`, LongRoPE's
    factors as tensors) gives transformers' logits past the original context, and so
    does Phi-4-mini's (RoPE over part of each head)."""
    directory, ref_model = tiny_dirs["phi3-longrope"]
    src = write_qwen_gguf(directory, ref_model, tmp_path / "phi.gguf", rope=None)
    ids = random_ids(90)
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    rt = Runtime.from_pretrained(src, dtype="float32", device="cpu")
    s = rt.args.rope_scaling
    assert (s.kind, s.original_max_position, s.factor) == ("longrope", 32, 8.0)
    torch.testing.assert_close(rt.logits(ids), ref, **logits_tolerance("phi3-longrope"))
    # Phi-4-mini: RoPE over 3/4 of each head (`rope.dimension_count`, no key length)
    directory, ref_model = tiny_dirs["phi4-partial-rope"]
    partial = write_qwen_gguf(directory, ref_model, tmp_path / "phi4.gguf", rope=None)
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    for _ in range(2):  # converted, then from the cache
        rt = Runtime.from_pretrained(partial, dtype="float32", device="cpu")
        assert (rt.args.head_dim, rt.args.rotary_dim) == (16, 12)
        torch.testing.assert_close(rt.logits(ids), ref, **logits_tolerance("phi4-partial-rope"))
    # a sliding window shorter than the context caps it (Phi-3-mini-4k's 2,047 of 4,096)
    windowed = write_qwen_gguf(directory, ref_model, tmp_path / "w.gguf", None, window=100)
    assert Runtime.from_pretrained(windowed, dtype="float32").args.max_seq_len == 100


def test_a_smollm3_gguf_matches_transformers(tmp_path):
    """SmolLM3: every 4th layer without RoPE, which its GGUF files do not say (llama.cpp
    takes it as a rule), and Q/K rows permuted as llama's."""
    from offload.loading import read_model_info
    from tests.conftest import make_tiny_hf_model

    ref_model = make_tiny_hf_model(tmp_path / "hf", "smollm3-nope", layers=4,
                                   no_rope_layer_interval=4)  # fmt: skip
    src = write_qwen_gguf(tmp_path / "hf", ref_model, tmp_path / "s.gguf", rope=None)
    ids = random_ids(90)
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    for _ in range(2):  # converted, then from the cache
        rt = Runtime.from_pretrained(src, dtype="float32", device="cpu")
        assert rt.args.nope_layers == (3,)
        assert read_model_info(src)["layers without rope"] == 1
        torch.testing.assert_close(rt.logits(ids), ref, **logits_tolerance("smollm3-nope"))


def test_rope_scaling_from_config(tmp_path):
    """YaRN stretches the context to original x factor (Qwen2.5's files keep 32,768 in
    max_position_embeddings); a linear scaling's files give the stretched context
    (LongChat: 16,384 at factor 8); an unsupported scaling is one error naming the file."""
    from offload.model_args import ModelArgs

    cfg = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 320,
           "max_position_embeddings": 32768,
           "rope_scaling": {"type": "yarn", "factor": 4.0,
                            "original_max_position_embeddings": 32768}}  # fmt: skip
    a = ModelArgs.from_hf_config(cfg, "q/config.json")
    assert a.max_seq_len == 131072 and a.rope_scaling.cos_sin_scale == pytest.approx(1.1386, 1e-4)
    linear = {"max_position_embeddings": 16384, "rope_scaling": {"type": "linear", "factor": 8}}
    a = ModelArgs.from_hf_config(cfg | linear, "q/config.json")
    assert a.max_seq_len == 16384 and a.rope_scaling.original_max_position == 2048
    # Phi-3: its original context beside rope_scaling, LongRoPE's factors one a pair
    phi = {"model_type": "phi3", "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                            "long_factor": [2.0] * 8}}  # fmt: skip
    a = ModelArgs.from_hf_config(cfg | phi, "q/config.json")
    assert a.max_seq_len == 131072 and a.rope_scaling.original_max_position == 4096
    assert a.rope_scaling.cos_sin_scale == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    # Phi-4-mini: RoPE over 3/4 of each head, so LongRoPE's factors are one a rotated pair
    partial = {"partial_rotary_factor": 0.75, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}}  # fmt: skip
    a = ModelArgs.from_hf_config(cfg | phi | partial, "q/config.json")
    assert (a.head_dim, a.rotary_dim, a.rope_dim) == (16, 12, 12)
    mini_4k = {"model_type": "phi3", "max_position_embeddings": 4096, "sliding_window": 2047}
    assert ModelArgs.from_hf_config(cfg | mini_4k, "q/config.json").max_seq_len == 2047
    for rope, error in [
        ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope scaling type 'dynamic'"),
        (
            phi["rope_scaling"] | {"long_factor": [2.0] * 7},
            "long_factor: 7 factors for 8 rotated dimension pairs",
        ),
        ({"rope_type": "default", "partial_rotary_factor": 1.5}, r"must be in \(0, 1\], got 1.5"),
        ({"partial_rotary_factor": 0.5625}, "rotary_dim must be an even number .* got 9"),
        ({"rope_type": "yarn", "factor": -1.0}, "rope scaling factor must be"),
        ({"rope_type": "yarn", "factor": "x"}, "invalid value"),
    ]:
        with pytest.raises(ConfigError, match=f"^q/config.json: .*{error}"):
            ModelArgs.from_hf_config(cfg | {"rope_scaling": rope}, "q/config.json")


def test_a_models_identity_is_what_sessions_saved_before_qwen3_and_yarn():
    """Saved sessions name their model by `ModelArgs.identity()` (in its fingerprint): the
    fields added for qwen3 and YaRN leave out their defaults, so a session saved before
    still matches its model. This repr is the one those sessions hashed."""
    from offload.model_args import ModelArgs, RopeScaling

    a = ModelArgs(arch="llama", dim=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                  hidden_dim=16, vocab_size=10, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))  # fmt: skip
    assert repr(a.identity()) == (
        "{'arch': 'llama', 'dim': 8, 'num_layers': 1, 'num_heads': 2, 'num_kv_heads': 1, "
        "'head_dim': 4, 'hidden_dim': 16, 'vocab_size': 10, 'norm_eps': 1e-05, "
        "'rope_theta': 10000.0, 'rope_scaling': {'factor': 8.0, 'low_freq_factor': 1.0, "
        "'high_freq_factor': 4.0, 'original_max_position': 8192}, 'rope_freq_factors': None, "
        "'max_seq_len': 4096, 'tie_embeddings': False, 'qkv_bias': False, 'bos_id': None, "
        "'eos_ids': ()}"
    )
    yarn = RopeScaling(4.0, original_max_position=32768, kind="yarn")
    b = dataclasses.replace(a, arch="qwen3", qk_norm=True, rope_scaling=yarn)
    assert b.identity()["qk_norm"] and b.identity()["rope_scaling"]["kind"] == "yarn"


def test_a_scaling_set_over_the_models_own(tiny_dirs, tmp_path):
    """`model.rope_scaling` gives a model whose files have no scaling (Qwen3's as
    shipped; its GGUF files too) the one transformers runs with that scaling, sets the
    context to ORIGINAL x FACTOR, and stays out of the converted GGUF's cache; a session
    saved with it loads with it."""
    directory, ref_model = tiny_dirs["qwen3-qknorm-yarn"]
    plain = tmp_path / "plain"
    shutil.copytree(directory, plain)
    cfg = json.loads((plain / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        cfg.get(key, {}).pop("rope_type", None), cfg.get(key, {}).pop("type", None)
    (plain / "config.json").write_text(json.dumps(cfg))
    src = write_qwen_gguf(directory, ref_model, tmp_path / "q.gguf", rope=None)
    ids = random_ids(90)
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    for model in (plain, src, src):  # the GGUF converted, then from its cache
        own = Runtime.from_pretrained(model, dtype="float32", device="cpu")
        assert own.args.rope_scaling is None and own.args.max_seq_len == 256
        assert (own.logits(ids) - ref).abs().max() > 1
        rt = Runtime.from_pretrained(model, dtype="float32", device="cpu", rope_scaling="yarn:4:24")
        assert rt.args.max_seq_len == 96 and rt.loaded.fingerprint != own.loaded.fingerprint
        torch.testing.assert_close(rt.logits(ids), ref, **logits_tolerance("qwen3-qknorm-yarn"))
    with pytest.raises(ConfigError, match="model.rope_scaling: the model was loaded with"):
        Runtime(own.loaded, rt.config, rt.device)
    answer = rt.generate("seven quiet stones", max_new_tokens=6)
    rt.save_session(tmp_path / "s")
    again = Runtime.load_session(tmp_path / "s", model=str(src))
    assert again.config.model.rope_scaling == "yarn:4:24"
    assert again.generate("seven quiet stones", max_new_tokens=6) == answer
    with pytest.raises(SessionError, match="made with model.rope_scaling 'yarn:4:24' .* 'unset'"):
        Runtime.load_session(tmp_path / "s", model=str(src), rope_scaling="")
    # without the original context: the file's own (256 here) x FACTOR
    assert Runtime.from_pretrained(plain, rope_scaling="linear:2").args.max_seq_len == 512
    for spec in ("yarn", "yarn:x", "yarn:0.5", "dynamic:2", "yarn:4:0", "yarn:4:8:1"):
        with pytest.raises(ConfigError, match=f"^model.rope_scaling: '{spec}' is not yarn:"):
            Runtime.from_pretrained(plain, rope_scaling=spec)


def test_a_gguf_tokenizers_split(tmp_path, monkeypatch):
    """A GGUF's `tokenizer.ggml.pre` picks how text is split before byte-level BPE:
    tekken (Mistral Nemo) splits words before capitals and digits one by one, gpt-4o
    (Phi-4-mini) likewise but with contractions and digits in threes; a name the
    runtime does not know splits as GPT-2 does and says so (a warning, kept with the
    converted file in the weight cache, and a note on the command line)."""
    import warnings

    from click.testing import CliRunner

    from cli.main import main
    from offload.loading import load
    from tests.gguf_files import write_gguf

    def pieces(tok, text):
        return [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]

    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tekken = load(write_gguf(tmp_path / "t.gguf", pre="tekken"), torch.float32, cpu).tokenizer
        o200k = load(write_gguf(tmp_path / "o.gguf", pre="gpt-4o"), torch.float32, cpu).tokenizer
    assert pieces(tekken, "HelloWorld 2024!\n") == ["Hello", "World", "Ġ", "2", "0", "2", "4", "!Ċ"]
    # (Phi-4-mini's) contractions stay on their word, in any case; digits go in threes
    assert pieces(o200k, "HelloWorld's 12345 DON'T\n") == [
        "Hello", "World's", "Ġ", "123", "45", "ĠDON'T", "Ċ"]  # fmt: skip
    src = write_gguf(tmp_path / "u.gguf", pre="brand-new")
    for _ in range(2):  # converted, then from the cache
        with pytest.warns(UserWarning, match="pre-tokenizer 'brand-new' is not one this runtime"):
            other = load(src, torch.float32, cpu, "auto").tokenizer
        assert pieces(other, "HelloWorld 2024") == ["HelloWorld", "Ġ2024"]
    result = CliRunner().invoke(main, ["generate", "-m", str(src), "-n", "2", "hi"])
    assert result.exit_code == 0, result.output
    assert "note: u.gguf: its tokenizer's pre-tokenizer 'brand-new' is not one" in result.stderr


def sentencepiece_reference(tokens, types, scores):
    """SentencePiece itself over a GGUF's vocabulary (a BPE model of its pieces, scores
    and types; the dummy prefix, spaces kept), encoding each piece of text between
    control tokens on its own, as llama.cpp does."""
    import re

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    piece = pb.ModelProto.SentencePiece
    kinds = {1: piece.NORMAL, 2: piece.UNKNOWN, 3: piece.CONTROL, 6: piece.BYTE}
    for token, kind, score in zip(tokens, types, scores, strict=True):
        p = m.pieces.add()
        p.piece, p.score, p.type = token, score, kinds[kind]
    sp = sentencepiece.SentencePieceProcessor(model_proto=m.SerializeToString())
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == 3]
    cut = re.compile("(" + "|".join(map(re.escape, control)) + ")")

    def encode(text: str) -> list[int]:
        ids = []
        for part in cut.split(text):
            ids += [tokens.index(part)] if part in control else sp.encode(part) if part else []
        return ids

    return encode, sp


def test_a_sentencepiece_gguf_tokenizer_matches_sentencepiece(tmp_path):
    """A SentencePiece GGUF (Llama 2, Mistral 7B, Phi-3: `tokenizer.ggml.model` "llama",
    pieces with scores and no merges) tokenizes as SentencePiece does (and llama.cpp):
    the merges its scores imply, U+2581 for spaces, the prefix before each piece of text
    between control tokens, leading spaces all kept, byte tokens for characters outside
    the vocabulary, control tokens whole; and it decodes back, streamed too.
    (transformers' GGUF loader is no reference: 5.17 tokenized so, 5.25 prefixes the
    first piece only, and not a text that starts with a space.)"""
    from offload.gguf import open_gguf
    from offload.tokenizer import StreamDecoder, Tokenizer
    from tests.gguf_files import spm_vocab, write_gguf

    encode, sp = sentencepiece_reference(*spm_vocab())
    src = write_gguf(tmp_path / "spm.gguf", sentencepiece=True)
    rt = Runtime.from_pretrained(src, dtype="float32")
    phi = write_gguf(tmp_path / "phi.gguf", sentencepiece=True, arch="phi3")
    phi_tokenizer = Tokenizer.from_gguf(open_gguf(phi), phi)
    texts = ["Seven quiet stones over the river.", "  two  spaces\nand a newline",
             "Zebra é ü 東京 9876", " leading space", "  x", "trailing  ", "tab\there", ""]  # fmt: skip
    for text in [*texts, "stones</s>after<s> more"]:
        ids = rt.tokenizer.encode(text)
        assert ids == encode(text) == phi_tokenizer.encode(text), text
        stream = StreamDecoder(rt.tokenizer, skip_special_tokens=False)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert streamed == rt.tokenizer.decode(ids)
        if text in texts:
            assert rt.tokenizer.decode(ids) == sp.decode(ids) == text
    # (the text after a control token keeps its prefix, as llama.cpp renders it)
    assert rt.tokenizer.decode(encode("stones</s>after<s> more")) == "stones</s> after<s>  more"
    assert any(i < 259 for i in rt.tokenizer.encode("東京"))  # byte tokens
    assert rt.tokenizer.stop_ids == (2,)  # </s>
    assert rt.generate("Seven quiet stones", max_new_tokens=4) is not None


def test_thinking_is_the_templates_enable_thinking(tiny_dirs, tmp_path):
    """`generation.thinking` on/off renders the chat template with `enable_thinking`
    True/False (Qwen3's switch), in prompts and in a document's questions; auto leaves
    it undefined, as transformers does by default."""
    model = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama-gqa-untied"][0], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% if enable_thinking is defined %}think={{ enable_thinking }}|{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    rt = Runtime.from_pretrained(model, dtype="float32")
    for thinking, shown in [("auto", ""), ("on", "think=True|"), ("off", "think=False|")]:
        rt.config = rt.config.replace(thinking=thinking)
        assert rt.tokenizer.decode(rt.encode_prompt("seven")) == shown + "seven"
    rt.load_document("quiet stones over the river")
    assert rt.tokenizer.decode(rt._document_ids()).startswith("think=False|quiet stones")
    with pytest.raises(ConfigError, match="generation.thinking: 'maybe' is not auto, on or off"):
        Runtime.from_pretrained(model, thinking="maybe")
