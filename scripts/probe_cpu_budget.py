"""What a CPU's host budget costs and holds past it: the embedded model loads a document
(real prose, --tokens of it) once within the budget and once with --budget times its
KV as `kv.host_bytes`, then asks the same questions of both (--new tokens each). For
each: the document's prefill seconds, each question's seconds and chunk-file reads,
the KV's resident memory (measured by `mincore`, not counted: the host slabs past the
budget, the dense cache within it) after the document and after the questions, and
whether every answer is the one given within the budget.

    python scripts/probe_cpu_budget.py [--tokens 7000] [--budget 0.25] [--new 16] [--out results/probe_cpu_budget.json]

A CPU keeps one LRU over every layer; past the budget the chunks leave one layer's slab
for another's, and the memory of the slots they leave is given back
(docs/storage.md, "On a CPU the host budget is one LRU over every layer").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from evalkit import prose, write_json
from rich.console import Console

from offload import Runtime
from storage.pinning import resident_bytes

QUESTIONS = [
    "How do I write a function in Vim script?",
    "What does the :let command do?",
    "How do I loop over a list?",
]
MiB = 1 << 20


def document(rt: Runtime, tokens: int) -> str:
    """The first `tokens` tokens of real prose (../shared/texts), as text."""
    return rt.tokenizer.decode(rt.tokenizer.encode(prose())[:tokens])


def kv_mib(rt: Runtime) -> float:
    """The resident memory of the KV's buffers: the host slabs of the tiered store, or
    (within the budget: mode "auto" on a CPU) the dense cache's tensors."""
    cache = rt._state.cache
    if cache.store is None:
        return sum(resident_bytes(t.data) for x in cache.layers for t in (x.k, x.v)) / MiB
    return sum(resident_bytes(h.slab) for h in cache.store.host) / MiB


def run(args, text: str, host_bytes: int | None, disk_dir: Path) -> dict:
    overrides = {"kv.disk_dir": str(disk_dir), "model.device": args.device}
    if host_bytes is not None:
        overrides["kv.host_bytes"] = host_bytes
    with Runtime.from_pretrained(**overrides) as rt:
        figures = rt.load_document(text)
        row = {
            "host_budget_mib": None if host_bytes is None else host_bytes / MiB,
            "document_tokens": figures["tokens"],
            "kv_mib": figures["tokens"] * rt.layout.token_bytes / MiB,
            "prefill_seconds": figures["prefill_seconds"],
            "kv_resident_after_document_mib": kv_mib(rt),
            "questions": [],
        }
        for q in QUESTIONS[: args.questions]:
            t = time.perf_counter()
            answer = rt.ask(q, max_new_tokens=args.new)
            row["questions"].append({
                "question": q, "answer": answer, "seconds": time.perf_counter() - t,
                # (the request's reads, counted from its start; none by the dense cache)
                "disk_read_mib": rt.stats().get("tier_read_bytes", {}).get("disk", 0) / MiB,
                "kv_resident_mib": kv_mib(rt),
            })  # fmt: skip
        store = rt._state.cache.store
        row["spilled_chunks"] = 0 if store is None else store.spilled_chunks
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=7000, help="of the document, about")
    ap.add_argument("--budget", type=float, default=0.25, help="x the document's KV")
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--new", type=int, default=16, help="tokens an answer")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (emulated: tests.emulated_run)")
    ap.add_argument("--out", type=Path, default=Path("results/probe_cpu_budget.json"))
    args = ap.parse_args()
    console = Console()
    with Runtime.from_pretrained(**{"model.device": "cpu"}) as rt:
        text = document(rt, args.tokens)
        kv_bytes = len(rt.tokenizer.encode(text)) * rt.layout.token_bytes
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for host_bytes in (None, int(args.budget * kv_bytes)):
            rows.append(run(args, text, host_bytes, Path(d)))
            console.print(rows[-1])
    within, past = rows
    past["answers_as_within_the_budget"] = [
        a["answer"] == b["answer"]
        for a, b in zip(within["questions"], past["questions"], strict=True)
    ]
    console.print({"answers_as_within_the_budget": past["answers_as_within_the_budget"]})
    write_json(console, args.out, {"threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
