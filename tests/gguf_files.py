"""Minimal GGUF files for tests: a llama-shaped model of one layer with a byte-level or a
SentencePiece vocabulary, its linears in one of the GGUF types, its metadata as a test
needs it (lying, missing, of the wrong kind)."""

from __future__ import annotations

from tests.conftest import filler_text


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece BPE vocabulary as a GGUF holds it (Llama 2's layout: <unk>, <s>,
    </s>, the 256 byte tokens, then pieces by descending score), trained on filler text:
    tokens, token types (1 normal, 2 unknown, 3 control, 6 byte) and scores."""
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(
        [filler_text(3000, seed=s) for s in range(3)], vocab_size=400, show_progress=False
    )
    vocab = trainer.get_vocab()
    # (characters first, then merges in order; the trainer's own <unk> is the file's first)
    pieces = [p for p in sorted(vocab, key=vocab.get) if p != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def write_gguf(path, block_count=1, context=256, merges=("a b",), template=None,
               tokenizer="gpt2", dim_key=True, pre=None, sentencepiece=False,
               arch="llama", control=(), dim=8, ff=16, quant=None, metadata=None):  # fmt: skip
    """A minimal llama GGUF: 1 layer, dim 8 (ffn 16), byte-level vocabulary (`tokenizer` names
    another kind, `pre` its pre-tokenizer; without `dim_key`, no embedding length;
    `control`: more control tokens); `sentencepiece`: a SentencePiece BPE vocabulary
    (`spm_vocab`) and no merges; `quant` (one gguf quantizes, Q4_0, Q4_1, Q5_0, Q8_0, or
    Q4_K): the type of the block linears whose inputs are whole blocks of it (32; Q4_K: 256);
    `metadata`: {key: (value, GGUFValueType, the array's item type or None)} written in
    place of what the key would hold, or None to leave the key out."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    heads, kv = 2, 1
    tokens = [chr(c) for c in range(33, 127)] + ["ab", *control, "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2 - len(control)) + [3] * len(control) + [3, 3]
    if sentencepiece:
        tokenizer, merges = "llama", None
        tokens, types, scores = spm_vocab()
    w = gguf.GGUFWriter(str(path), arch)  # (another arch: for its tokenizer alone)
    w.add_block_count(block_count)
    w.add_context_length(context)
    if dim_key:
        w.add_embedding_length(dim)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(list(merges))
    if sentencepiece:
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        w.add_bos_token_id(len(tokens) - 2)
        w.add_eos_token_id(len(tokens) - 1)
    if template is not None:
        w.add_chat_template(template)
    hd = dim // heads
    shapes = {"token_embd.weight": (len(tokens), dim), "output_norm.weight": (dim,)}
    for i in range(1):
        shapes |= {f"blk.{i}.attn_q.weight": (heads * hd, dim), f"blk.{i}.attn_k.weight": (kv * hd, dim),
                   f"blk.{i}.attn_v.weight": (kv * hd, dim), f"blk.{i}.attn_output.weight": (dim, heads * hd),
                   f"blk.{i}.ffn_gate.weight": (ff, dim), f"blk.{i}.ffn_up.weight": (ff, dim),
                   f"blk.{i}.ffn_down.weight": (dim, ff), f"blk.{i}.attn_norm.weight": (dim,),
                   f"blk.{i}.ffn_norm.weight": (dim,)}  # fmt: skip
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        kind = quant and gguf.GGMLQuantizationType[quant]
        # (as llama.cpp leaves them: rows that are not whole blocks stay float)
        block = kind and name.startswith("blk.") and len(shape) == 2
        if not block or shape[1] % gguf.GGML_QUANT_SIZES[kind][0]:
            w.add_tensor(name, x)
            continue
        blocks = q4_k_blocks(x) if quant == "Q4_K" else gguf.quants.quantize(x, kind)
        w.add_tensor(name, blocks, raw_dtype=kind)
    for key, typed in (metadata or {}).items():
        w.kv_data[0].pop(key, None)
        if typed is not None:
            w.kv_data[0][key] = gguf.GGUFValue(*typed)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q4_k_blocks(x):
    """llama.cpp's Q4_K blocks of `x` [n, k] (k in 256s; gguf-py only reads them): per
    256 inputs a float16 scale and minimum, 6-bit multiples of them for each 32 (packed
    in 12 bytes), and the 4-bit codes, two sub-blocks to a run of 32 bytes. Plain
    min/max per 32, not llama.cpp's search for the best scales."""
    import gguf
    import numpy as np

    n, k = x.shape
    g = x.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(g.min(-1), 0)  # [n, blocks, 8]: the minimum is -dmin * m, m >= 0
    scale = (g.max(-1) - lo) / 15
    d = np.maximum(scale.max(-1), 1e-8) / 63
    dmin = np.maximum((-lo).max(-1), 1e-8) / 63
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(scale / d.astype(np.float32)[..., None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin.astype(np.float32)[..., None]), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[..., None] * sc)[..., None]
    q = np.clip(np.round((g + (dmin.astype(np.float32)[..., None] * m)[..., None]) / step), 0, 15)
    q = q.astype(np.uint8)  # [n, blocks, 8, 32]
    packed = np.concatenate([sc[..., :4] | (sc[..., 4:] >> 4) << 6,
                             m[..., :4] | (m[..., 4:] >> 4) << 6,
                             (sc[..., 4:] & 15) | (m[..., 4:] & 15) << 4], axis=-1)  # fmt: skip
    qs = (q[..., 0::2, :] | q[..., 1::2, :] << 4).reshape(n, k // 256, 128)
    blocks = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8),
                             packed, qs], axis=-1)  # fmt: skip
    out = blocks.reshape(n, -1)
    back = gguf.quants.dequantize(out, gguf.GGMLQuantizationType.Q4_K)
    assert np.abs(back - x).max() <= 1.01 * step.max()  # (the encoding read back)
    return out
