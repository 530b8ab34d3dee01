"""What loading a saved session costs, without a model: the KV of --layers layers x
--tokens tokens of the Llama-3.1-8B shape (8 KV heads x 128, bf16, random) saved as a
session, then opened and adopted by a fresh store (`offload ask` does this in every
process) and the abstracts read (as their first use does), --runs + 1 times; the last time the rest
is read into host memory as well, 256 tokens are appended (a chat turn) and the session
is saved over itself (`resave_seconds`: the unchanged chunk files linked, the rest
written). Before that last time, a question's row reads from the files
(`question_rows`): loaded with the least host budget (two chunks a layer: a session
past it; a question asked while the warm-up runs reads so too), each layer's rows of
--selected random tokens a KV head are gathered (`gather_selected`) twice: the first
read checks the chunks it touches (`first_ms`), the second reads them only (`again_ms`).

    python scripts/bench_session_load.py [--layers 4] [--tokens 131072] [--runs 4]
        [--selected 2048] [--dir /tmp/offload-bench-load]
        [--out results/bench_session_load.json]

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


def new_store(layout: KVLayout, tokens: int, disk_dir: Path, host: int | None = None):
    host = host or layout.num_layers * (layout.num_chunks(tokens) + 64) * layout.chunk_bytes
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


def load(layout: KVLayout, tokens: int, path: Path, work: Path, host: int | None = None):
    session = open_session(path, verify_later=True)
    opened = time.perf_counter()
    store = new_store(layout, tokens, work / "loaded", host)
    files = [(f["layer"], (session.version_dir / f["name"]).absolute(), f["chunks"], f["crc32"])
             for f in session.chunk_files()]  # fmt: skip
    store.adopt(tokens, files, session.device_tensors(), session.abstract_tensors)
    session.verified()
    return store, opened


def question_rows(layout: KVLayout, tokens: int, path: Path, work: Path, k: int) -> dict:
    store, _ = load(layout, tokens, path, work, host=2 * layout.num_layers * layout.chunk_bytes)
    gen = torch.Generator().manual_seed(1)
    first, again = [], []
    for layer in range(layout.num_layers):
        heads = [torch.randperm(tokens, generator=gen)[:k] for _ in range(layout.num_kv_heads)]
        ids = torch.stack(heads).sort(1).values
        for times in (first, again):
            t = time.perf_counter()
            with store.lock:
                store.gather_selected(layer, ids)
            times.append(round(1e3 * (time.perf_counter() - t), 1))
    store.close()
    return {"selected": k, "first_ms": first, "again_ms": again}


def load_once(layout: KVLayout, tokens: int, path: Path, work: Path, read_in: bool) -> dict:
    t0 = time.perf_counter()
    store, opened = load(layout, tokens, path, work)
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
    ap.add_argument("--selected", type=int, default=2048)
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
        rows = question_rows(layout, args.tokens, path, args.dir, args.selected)
        runs.append(load_once(layout, args.tokens, path, args.dir, True))  # (saved again)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    out = {"layers": args.layers, "tokens": args.tokens, **made, "runs": runs,
           "question_rows": rows}  # fmt: skip
    for key in runs[-1]:
        values = sorted(r[key] for r in runs if key in r)
        print(f"{key:24s} {values[0]:.3f} - {values[-1]:.3f} s")
    print(f"question rows ({rows['selected']} a KV head) ms a layer: first {rows['first_ms']}, "
          f"again {rows['again_ms']}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(
        f"session {made['session_gib']:.2f} GiB, saved in {made['save_seconds']:.1f} s; {args.out}"
    )


if __name__ == "__main__":
    main()
