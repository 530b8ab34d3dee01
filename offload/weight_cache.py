"""A cache of converted GGUF models (and of HF directories quantized on CUDA): the
first start converts, later ones map a file.

Reading a GGUF means parsing its metadata in Python (the embedded model's vocabulary
and merges take about 2 s), dequantizing every tensor, and repacking the block
linears for the CPU kernels (2-3 s more). None of that changes between starts, so
the result is written once, as a safetensors file of the model's own tensors with
the model's config and tokenizer in its metadata, and later starts load that file
instead (no pickle: tensors and JSON only).

An HF directory is cached only where its block linears run at int4 (on CUDA by
`auto` or `int4`, on the CPU by `int4`; offload/quantize.py, `Int4Packer`): a start
then reads and quantizes every dense weight (27.5 GiB for a 14B model), where the
cache holds 10.6 GiB. A dense directory loads from its own safetensors, which the
cache would only copy.

The key covers everything the result depends on: the source file (size, mtime,
first and last MiB), the dtype, the weight form, torch's version, the machine's
architecture and its CPU's vector extension (torch's packed int4 form differs between
AVX2 and AVX-512), and this module's format version. A cache file that cannot be read
or does not match is ignored and rewritten; one that cannot be written (read-only
home, full disk) only costs the next start its speed. The folder is
`$OFFLOAD_CACHE`, else `$XDG_CACHE_HOME/offload`, else `~/.cache/offload`.

The cache holds one entry per source file name, dtype and weight form (its "slot"):
writing an entry removes the others of its slot, which a reinstalled model file (a new
mtime), a new torch or a new format has made unreachable. Without that, every
reinstall left another copy of the model behind (220 MB each for the embedded one).
A write interrupted by Ctrl-C removes its partial file; one whose process was killed
is removed by the next write (the file names its process). Each tensor's crc32 is kept
in the metadata and checked when the file is read (ISA-L's: about 16 ms for the
embedded model's 165 MB here), so a file damaged on disk is converted again, never run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import uuid
from pathlib import Path

import torch

# 2: GGUF rope scaling (yarn, linear) read into the stored args; 3: the CPU int4 kernel's
# scales from the float16 ones the codes keep; 4: the CPU's int4 codes held once; 5: a
# SentencePiece GGUF's tokenizer (kept beside the weights) prefixes each piece of text;
# 6: each tensor's crc32 in the metadata, checked at every load
CACHE_FORMAT = 6
EDGE_BYTES = 1 << 20  # bytes hashed at each end of the source file
THREADED_CRC_BYTES = 1 << 30  # a cache file's tensors checked on threads past this


def cache_dir() -> Path:
    if os.environ.get("OFFLOAD_CACHE"):
        return Path(os.environ["OFFLOAD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "offload"


def cache_path(source: Path, dtype: torch.dtype, weights: str) -> Path:
    """`<stem>-<slot>-<content>.safetensors` in the cache folder (the slot: module doc).
    `source` is a GGUF file, or an HF directory (every file in it counts: its name,
    size and mtime, and a safetensors shard's first and last MiB)."""
    slot = hashlib.sha256(f"{source.name}|{dtype}|{weights}".encode()).hexdigest()[:8]
    h = hashlib.sha256(
        f"{CACHE_FORMAT}|{torch.__version__}|{platform.machine()}|"
        f"{torch.backends.cpu.get_cpu_capability()}|{dtype}|{weights}|".encode()
    )
    if source.is_dir():
        h.update(b"dir")
        for f in sorted(p for p in source.iterdir() if p.is_file()):
            st = f.stat()
            h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
            if f.suffix == ".safetensors":
                _hash_edges(h, f, st.st_size)
        stem = source.name
    else:
        st = source.stat()
        h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
        _hash_edges(h, source, st.st_size)
        stem = source.stem
    return cache_dir() / "weights" / f"{stem}-{slot}-{h.hexdigest()[:24]}.safetensors"


def _hash_edges(h, path: Path, size: int) -> None:
    with open(path, "rb") as f:
        h.update(f.read(EDGE_BYTES))
        f.seek(max(0, size - EDGE_BYTES))
        h.update(f.read(EDGE_BYTES))


def _superseded(path: Path) -> list[Path]:
    """The other entries of `path`'s slot, and entries named before slots existed
    (`<stem>-<24 hex>.safetensors`, never read again)."""
    stem, slot, _ = path.name.removesuffix(".safetensors").rsplit("-", 2)
    old = []
    for other in path.parent.glob(f"{glob.escape(stem)}-*.safetensors"):
        rest = other.name.removesuffix(".safetensors")[len(stem) + 1 :].split("-")
        ours = len(rest) == 2 and rest[0] == slot
        legacy = len(rest) == 1 and len(rest[0]) == 24
        if other != path and (ours or legacy):
            old.append(other)
    return old


TEMP_NAME = re.compile(r"\..+\.safetensors\.(\d+)-[0-9a-f]{8}\.tmp")


def _orphaned_temps(folder: Path) -> list[Path]:
    """Partial cache files of writers that are gone (killed while converting)."""
    from storage.stale import process_gone

    orphans = []
    for f in folder.glob(".*.tmp"):
        m = TEMP_NAME.fullmatch(f.name)
        if m and int(m.group(1)) != os.getpid() and process_gone(int(m.group(1))):
            orphans.append(f)
    return orphans


def load_cached(path: Path, dtype: torch.dtype, device: torch.device, mode: str):
    """(model, tokenizer) from the cache file at `path`, or None when it is not usable,
    or when its weight form is not what `mode` (`model.weights`) resolves to now (on
    CUDA, `auto` follows the memory free there)."""
    from safetensors import safe_open

    from offload.model import Transformer
    from offload.model_args import ModelArgs, RopeScaling
    from offload.quantize import quantize_model
    from offload.tokenizer import Tokenizer
    from offload.weight_forms import resolve_weights, weight_bytes

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads(f.metadata()["offload"])
            state = {name: f.get_tensor(name) for name in f.keys()}
        if meta.get("format") != CACHE_FORMAT or meta["crc32"] != _crc32s(state):
            return None
        weights = meta["weights"]
        a = dict(meta["args"])
        a["rope_scaling"] = RopeScaling(**a["rope_scaling"]) if a["rope_scaling"] else None
        for key in ("rope_freq_factors", "eos_ids"):
            a[key] = tuple(a[key]) if a[key] is not None else None
        args = ModelArgs(**a)
        dense = weight_bytes(args, dtype.itemsize, "dense")
        if resolve_weights(mode, meta["source_quant"], device, dense) != weights:
            return None
        # Only factory calls on the meta device: its Python kernels (cat, normal_) would
        # import a second of torch machinery.
        with torch.device("meta"):
            model = Transformer(args, fused=True).to(dtype)
            if weights != "dense":
                quantize_model(model, weights, empty=True, device=device)
        model.load_state_dict(
            {k: v.to(device) for k, v in state.items()}, strict=not meta["tied"], assign=True
        )
        if meta["tied"]:  # the head is the embedding (its tensor is stored once)
            model.tie_weights()
        model.eval()
        model.source_quant, model.weights = meta["source_quant"], weights
        tokenizer = Tokenizer.from_state(meta["tokenizer"])
    except Exception:  # a damaged, foreign or older cache file: convert again
        return None
    return model, tokenizer


def _crc32s(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each (contiguous, CPU) tensor's crc32 over its bytes; on threads past
    `THREADED_CRC_BYTES` (the checksum lets go of the GIL: 2 GB took 0.19 s on one core
    here, 0.09 on two; a 14B model's 10.6 GiB at int4 would take about 1 s on one)."""
    from storage import threads
    from storage.disk import crc32

    def one(t: torch.Tensor) -> int:
        return crc32(t.reshape(-1).view(torch.uint8).numpy())

    workers = min(8, os.cpu_count() or 1)
    if workers < 2 or sum(t.nbytes for t in state.values()) < THREADED_CRC_BYTES:
        return {name: one(t) for name, t in state.items()}  # (threads cost more: 16 -> 36 ms)
    with threads.pool(workers, "offload-crc") as pool:
        return dict(zip(state, pool.map(one, state.values()), strict=True))


def store(path: Path, model, tokenizer, weights: str) -> bool:
    """Write the converted model to `path` (atomically); False when it cannot be written."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    # (an int8 head is not tied; on CUDA the int4 form keeps the head dense, and tied)
    tied = getattr(model.output, "weight", None) is model.tok_embeddings.weight
    state = {k: v.contiguous().cpu() for k, v in model.state_dict().items()}
    if tied:
        state.pop("output.weight")
    meta = {
        "format": CACHE_FORMAT,
        "weights": weights,
        "args": model.args.to_dict(),
        "tied": tied,
        "source_quant": getattr(model, "source_quant", None),
        "tokenizer": tokenizer.to_state(),
        "crc32": _crc32s(state),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in _orphaned_temps(path.parent):  # (their room may be needed now)
            with contextlib.suppress(OSError):
                stale.unlink()
        save_file(state, str(tmp), metadata={"offload": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C during a write of gigabytes included
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):
            return False
        raise
    for old in _superseded(path):  # a process still reading one keeps its open file
        with contextlib.suppress(OSError):
            old.unlink()
    return True
