"""A session version's files (storage/session.py has the layout), written by `save_session`
into its temporary folder: the chunk files of every layer and the tensor files, on
threads; a loaded session's unchanged chunk files are hard-linked instead."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from storage import threads
from storage.abstracts import ABSTRACT_KEYS, ChunkAbstracts
from storage.atomic import existing_ancestor
from storage.disk import DiskTier, crc32_digest
from storage.errors import SessionError
from storage.hashing import file_entry
from storage.layout import KVLayout

SUMMARY_KEYS = ("codes", "scale", "zero")
MAX_CHUNKS_PER_FILE = 1024
SAVE_THREADS = min(8, os.cpu_count() or 1)  # files written at once by a save


def write_files(tmp: Path, store, index: dict, index_meta: dict) -> dict[str, dict]:
    """A version's files but its manifest, into `tmp`: the chunk files of every layer,
    MAX_CHUNKS_PER_FILE chunks a file, and the tensor files, on SAVE_THREADS threads
    (the copies out of the host slab, the checksums, the encoding and the writes release
    the GIL: the 8B shape's 128k tokens are 256 chunk files of 80 MiB and 5 GiB of
    summaries and abstracts). Returns the manifest's entry of each file."""
    L: KVLayout = store.layout
    n_chunks = L.num_chunks(store.num_tokens)
    writer = DiskTier(tmp / "kv", L, store.dtype, budget_bytes=1 << 62)
    # Each layer's abstracts settled here, once, not by several threads at once, and on
    # the host (on the device with the chunk selector on CUDA): the abstracts' file and
    # the chunk files both take them from there.
    abstracts = [
        ChunkAbstracts(*(getattr(store.dev[layer].abstracts(), k).contiguous().cpu()
                         for k in ABSTRACT_KEYS))
        for layer in range(L.num_layers)
    ]  # fmt: skip
    tensors = {"device.safetensors": ({}, None), "abstracts.safetensors": ({}, None)}
    for layer in range(L.num_layers):
        s = store.dev[layer].summaries()
        for key in SUMMARY_KEYS:
            tensors["device.safetensors"][0][f"L{layer}.{key}"] = getattr(s, key).contiguous().cpu()
        for key in ABSTRACT_KEYS:
            tensors["abstracts.safetensors"][0][f"L{layer}.{key}"] = getattr(abstracts[layer], key)
    if index:
        tensors["index.safetensors"] = (index, index_meta)
    local = threading.local()  # each thread's buffer, reused from file to file (fresh
    # pages for each file's 64 MiB cost as much as the copy into them)

    def write(layer: int, chunks: list[int]) -> tuple[str, dict]:
        c0 = chunks[0]
        linked = _link_saved(store, layer, chunks, tmp / "kv")
        if linked is not None:
            name, crcs = linked
        else:
            if getattr(local, "buf", None) is None:
                local.buf = store.chunk_buffer(MAX_CHUNKS_PER_FILE)
            data = store.read_chunks(layer, chunks, out=local.buf[: len(chunks)])
            a = abstracts[layer]  # (a trailing partial chunk has none: padded)
            full = ChunkAbstracts(*(t[c0 : c0 + len(chunks)] for t in (a.kmin, a.kmax, a.kmean)))
            name = writer.write_chunks(layer, chunks, data, _pad_abstracts(full, len(chunks), L))
            crcs = writer.crc32s(name)
        return f"kv/{name}", {
            "size": (tmp / "kv" / name).stat().st_size, "layer": layer,
            "first_chunk": c0, "num_chunks": len(chunks), "crc32_sha256": crc32_digest(crcs),
        }  # fmt: skip

    pool = threads.pool(SAVE_THREADS, "offload-save")
    try:
        jobs = [
            pool.submit(_save_tensors, tmp / name, t, meta) for name, (t, meta) in tensors.items()
        ]
        jobs += [pool.submit(write, layer, chunks) for layer in range(L.num_layers)
                 for chunks in file_groups(n_chunks)]  # fmt: skip
        return dict(job.result() for job in jobs)
    finally:  # (a file failed: those not begun are not written)
        pool.shutdown(wait=True, cancel_futures=True)


def file_groups(n_chunks: int) -> list[list[int]]:
    """The chunks of a layer's files, in order: MAX_CHUNKS_PER_FILE a file."""
    return [list(range(c0, min(n_chunks, c0 + MAX_CHUNKS_PER_FILE)))
            for c0 in range(0, n_chunks, MAX_CHUNKS_PER_FILE)]  # fmt: skip


def least_written(store) -> int:
    """The least a save of `store` writes: `KVLayout.session_bytes` less the chunk files a
    loaded session's files may give by a link (`_link_saved`), counted generously, so that
    a save refused for want of room (`storage.session.save_session`) would not have fit."""
    L: KVLayout = store.layout
    groups = file_groups(L.num_chunks(store.num_tokens))
    linked = sum(
        len(g) for layer in range(L.num_layers) for g in groups if store.may_link(layer, g)
    )
    return max(0, L.session_bytes(store.num_tokens) - linked * L.disk_bytes_per_chunk())


def check_space(path: Path, nbytes: int) -> None:
    """Refuse (SessionError) a save of at least `nbytes` into `path` where its file system
    has less free: by every save before it writes (a save that fills the disk fails there,
    after a disk full for every other writer), and by `offload ingest` before its long
    prefill, whose save would otherwise fail at its end. A save writes its new version
    whole before it removes the old one, so a session it replaces frees nothing first.
    Where the file system cannot say, the save will (or its folder's creation)."""
    path = Path(path).expanduser()
    probe = existing_ancestor(path)
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return
    free = usage.free
    if usage.total and free < nbytes:  # (no size at all: /proc's, which cannot hold one)
        from offload.config import human_bytes

        raise SessionError(
            f"cannot save session to {path}: the save writes at least {human_bytes(nbytes)}, "
            f"and {probe} has {human_bytes(free)} free"
        )


def _link_saved(store, layer: int, chunks: list[int], kv_dir: Path) -> tuple[str, list] | None:
    """A hard link in `kv_dir` to the file of a loaded session that holds exactly these
    chunks (unchanged: a chunk's KV never changes while it has a disk record): its name
    and crc32s; None where there is no such file or it cannot be linked (another file
    system, or another process's save removed it since: the chunks are then written). A
    session saved again after a chat turn so writes only the files of its new chunks (a
    128k session of the 8B shape is 256 files of 80 MiB)."""
    source = store.file_holding(layer, chunks)
    if source is None:
        return None
    path = store.disk.directory / source  # (a session's file: its absolute path)
    try:
        os.link(path, kv_dir / path.name)
    except OSError:
        return None
    return path.name, store.disk.crc32s(source)


def _pad_abstracts(abstracts: ChunkAbstracts, n: int, L: KVLayout) -> ChunkAbstracts:
    """Abstracts of `n` chunks; a trailing partial chunk (no abstract yet) gets zeros."""
    have = abstracts.kmin.shape[0]
    if have == n:
        return abstracts
    pad = torch.zeros(n - have, L.num_kv_heads, L.head_dim)
    return ChunkAbstracts(
        *(torch.cat([t, pad]) for t in (abstracts.kmin, abstracts.kmax, abstracts.kmean))
    )


def _save_tensors(path: Path, tensors: dict, meta: dict | None = None) -> tuple[str, dict]:
    """Write a tensor file; its name and manifest entry."""
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta or {})})
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return path.name, file_entry(path)
