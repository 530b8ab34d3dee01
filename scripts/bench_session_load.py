"""What loading a saved session costs, without a model: the KV of --layers layers x
--tokens tokens of the Llama-3.1-8B shape (8 KV heads x 128, bf16, random) saved as a
session, then opened and adopted by a fresh store (`offload ask` does this in every
process) and the abstracts read (as their first use does), --runs + 1 times; the last time the rest
is read into host memory as well, 256 tokens are appended (a chat turn) and the session
is saved over itself (`resave_seconds`: the unchanged chunk files linked, the rest
written).

    python scripts/bench_session_load.py [--layers 4] [--tokens 131072] [--runs 4]
        [--dir /tmp/offload-bench-load] [--out results/bench_session_load.json]

The session's files stay in the page cache between runs (they were just written):
a load from a cold disk reads them too. Figures scale with the layers (32 for the
8B model) but the manifest.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from storage.layout import KVLayout
from storage.session import SessionContents, open_session, save_session
from storage.tiered import TieredStore


def new_store(layout: KVLayout, tokens: int, disk_dir: Path) -> TieredStore:
    host = layout.num_layers * (layout.num_chunks(tokens) + 64) * layout.chunk_bytes
    return TieredStore(layout, torch.bfloat16, torch.device("cpu"), host_bytes=host,
                       disk_dir=disk_dir, disk_bytes=1 << 50).start()  # fmt: skip


def make_session(layout: KVLayout, tokens: int, path: Path, work: Path) -> dict:
    store = new_store(layout, tokens, work / "made")
    gen = torch.Generator().manual_seed(0)
    H, D = layout.num_kv_heads, layout.head_dim
    for layer in range(layout.num_layers):
        for _ in range(0, tokens, 16384):
            k = torch.randn(H, 16384, D, generator=gen).to(torch.bfloat16)
            with store.lock:
                store.append(layer, k, k * 0.5)
    t = time.perf_counter()
    nbytes = save_session(path, store, SessionContents(list(range(tokens)), META, {}, {})).bytes
    store.close()
    return {"save_seconds": time.perf_counter() - t, "session_gib": nbytes / 2**30}


META = {"kind": "prompt", "model": {"fingerprint": "bench", "source": "bench", "arch": "llama"},
        "tokenizer_sha256": "0" * 64, "config": {}}  # fmt: skip
TURN = 256  # tokens a chat turn appends before the session is saved again


def load_once(layout: KVLayout, tokens: int, path: Path, work: Path, read_in: bool) -> dict:
    t0 = time.perf_counter()
    session = open_session(path, verify_later=True)
    opened = time.perf_counter()
    store = new_store(layout, tokens, work / "loaded")
    files = [(f["layer"], (session.version_dir / f["name"]).absolute(), f["chunks"], f["crc32"])
             for f in session.chunk_files()]  # fmt: skip
    store.adopt(tokens, files, session.device_tensors(), session.abstract_tensors)
    session.verified()
    loaded = time.perf_counter()
    for dev in store.dev:
        dev.abstracts()
    abstracts = time.perf_counter()
    out = {"open_seconds": opened - t0, "load_seconds": loaded - t0,
           "abstracts_ready_seconds": abstracts - t0}  # fmt: skip
    if read_in:
        store.warm().wait()
        out["read_in_seconds"] = time.perf_counter() - abstracts
        k = torch.randn(layout.num_kv_heads, TURN, layout.head_dim).to(torch.bfloat16)
        with store.lock:
            for layer in range(layout.num_layers):
                store.append(layer, k, k)
        t = time.perf_counter()
        save_session(path, store, SessionContents(list(range(tokens + TURN)), META, {}, {}), True)
        out["resave_seconds"] = time.perf_counter() - t
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/offload-bench-load"))
    ap.add_argument("--out", type=Path, default=Path("results/bench_session_load.json"))
    args = ap.parse_args()
    layout = KVLayout(num_layers=args.layers, num_kv_heads=8, head_dim=128, dtype="bfloat16",
                      chunk_size=16, summary_bits=2)  # fmt: skip
    shutil.rmtree(args.dir, ignore_errors=True)
    path = args.dir / "session"
    try:
        made = make_session(layout, args.tokens, path, args.dir)
        # (the read-in, 2 GiB of host memory per 4 layers, once: after it, memory churn
        # would blur the loads)
        runs = [load_once(layout, args.tokens, path, args.dir, False) for _ in range(args.runs)]
        runs.append(load_once(layout, args.tokens, path, args.dir, True))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    out = {"layers": args.layers, "tokens": args.tokens, **made, "runs": runs}
    for key in runs[-1]:
        values = sorted(r[key] for r in runs if key in r)
        print(f"{key:24s} {values[0]:.3f} - {values[-1]:.3f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(
        f"session {made['session_gib']:.2f} GiB, saved in {made['save_seconds']:.1f} s; {args.out}"
    )


if __name__ == "__main__":
    main()
