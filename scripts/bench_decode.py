"""Decode ms/token against context length: in-memory dense, tiered dense, tiered sparse.

    python scripts/bench_decode.py [--lengths 512,1024,2048,4096,8000] [--selectors cluster,summary]
        [--tokens 16] [--out results/bench_decode.json]

One prefill per length (real prose from ../shared/texts) serves every tiered
setting; the in-memory ("full") cache is prefilled separately. Greedy, the
end-of-turn token ignored, bf16, this machine's threads. The prefetch pipeline
does not exist yet, so there is no prefetch on/off column.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import DEFAULT_TEXTS, PrefilledContext, prose, write_json  # noqa: E402

from offload import Runtime  # noqa: E402
from offload.generate import generate_steps, make_sampler, prefill  # noqa: E402


def full_ms_per_token(rt: Runtime, ids: list[int], tokens: int) -> float:
    full = Runtime(rt.loaded, rt.config.replace(mode="full"), rt.device)
    cache = full.new_cache()
    prefill(full.model, cache, ids[:-1], full.config.generation.prefill_chunk)
    tok = dataclasses.replace(full.tokenizer, stop_ids=())
    steps = list(generate_steps(full.model, cache, tok, ids[-1:], tokens + 1, make_sampler()))
    return 1000 * sum(s.step_seconds for s in steps[1:]) / tokens


def tiered_ms_per_token(ctx: PrefilledContext, selection, tokens: int) -> tuple[float, dict]:
    ctx.decode(selection, 2)  # warm up (and build the index outside the timing)
    t = time.perf_counter()
    _, stats = ctx.decode(selection, tokens + 1)
    total = time.perf_counter() - t
    per = {"selection_ms": 1000 * stats.selection_seconds / (tokens + 1),
           "fetch_ms": 1000 * stats.fetch_seconds / (tokens + 1)}  # fmt: skip
    return 1000 * total / (tokens + 1), per


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="512,1024,2048,4096,8000")
    ap.add_argument("--selectors", default="cluster,summary")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--out", type=Path, default=Path("results/bench_decode.json"))
    args = ap.parse_args()
    console = Console()
    rt = Runtime.from_pretrained(args.model, mode="sparse")
    text_ids = rt.tokenizer.encode(prose(args.texts))
    base = rt.config.selection
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = text_ids[:length]
        row = {"context": length, "full": full_ms_per_token(rt, ids, args.tokens)}
        ctx = PrefilledContext(rt, ids)
        row["tiered dense"], _ = tiered_ms_per_token(
            ctx, dataclasses.replace(base, mode="dense"), args.tokens
        )
        for sel in args.selectors.split(","):
            ms, parts = tiered_ms_per_token(
                ctx, dataclasses.replace(base, mode="sparse", selector=sel), args.tokens
            )
            row[f"sparse {sel}"] = ms
            row[f"sparse {sel} parts"] = parts
        ctx.close()
        rows.append(row)
        console.print(row)
    cols = [k for k in rows[0] if not k.endswith("parts")]
    table = Table(
        title=f"decode ms/token, {args.model}, {torch.get_num_threads()} threads (sparse: 5% + sink + window)"
    )
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) if c == "context" else f"{r[c]:.1f}" for c in cols))
    console.print(table)
    write_json(console, args.out, {"rows": rows})


if __name__ == "__main__":
    main()
