"""What a CPU's host budget costs and holds past it: the embedded model loads a document
(real prose, --tokens of it) once within the budget and once with --budget times its
KV as `kv.host_bytes`, then asks the same questions of both (--new tokens each). For
each: the document's prefill seconds, each question's seconds and chunk-file reads,
the host slabs' resident memory (measured by `mincore`, not counted) after the document
and after the questions, and whether every answer is the one given within the budget.

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
from storage.reading import TierReads

QUESTIONS = [
    "How do I write a function in Vim script?",
    "What does the :let command do?",
    "How do I loop over a list?",
]
MiB = 1 << 20


def document(rt: Runtime, tokens: int) -> str:
    """The first `tokens` tokens of real prose (../shared/texts), as text."""
    return rt.tokenizer.decode(rt.tokenizer.encode(prose())[:tokens])


def slabs_mib(rt: Runtime) -> float:
    return sum(resident_bytes(h.slab) for h in rt._state.cache.store.host) / MiB


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
            "slabs_resident_after_document_mib": slabs_mib(rt),
            "questions": [],
        }
        for q in QUESTIONS[: args.questions]:
            store = rt._state.cache.store
            store.reads = TierReads()
            t = time.perf_counter()
            answer = rt.ask(q, max_new_tokens=args.new)
            row["questions"].append({
                "question": q, "answer": answer, "seconds": time.perf_counter() - t,
                "disk_read_mib": store.reads.nbytes["disk"] / MiB,
                "slabs_resident_mib": slabs_mib(rt),
            })  # fmt: skip
        row["spilled_chunks"] = rt._state.cache.store.spilled_chunks
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
