"""Long-document QA: ingest documents once (or reuse a session), answer many questions.

    python scripts/longdoc_qa.py --docs ../shared/texts/vim-usr_20.txt \
        --questions scripts/qa/vim-usr_20.jsonl --session /tmp/vim20 [--out results/longdoc_qa.jsonl]

Questions are JSONL: {"question": "...", "answers": ["gold", "alias", ...]} (answers
optional). An answer counts as correct when it contains one of the gold strings
(case-insensitive). Each question starts from the document's saved state; the
time to first token is measured per question. With --compare-reingest the same
run also times a fresh ingest of the documents, for the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from offload import OffloadError, Runtime, StorageError
from offload.documents import read_documents


def read_questions(path: Path) -> list[dict]:
    if not path.is_file():
        raise OffloadError(f"questions file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise OffloadError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise OffloadError(f'{path}:{n}: each line needs a "question" string')
        out.append(item)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--docs", nargs="+", type=Path, required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument(
        "--session", type=Path, required=True, help="reused when it exists, else created"
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument(
        "--compare-reingest", action="store_true", help="also time a fresh ingest in this run"
    )
    ap.add_argument("--out", type=Path, default=Path("results/longdoc_qa.jsonl"))
    args = ap.parse_args()
    console = Console()
    try:
        questions = read_questions(args.questions)
        text = read_documents(tuple(str(d) for d in args.docs))
        ingest_s = None
        if not (args.session / "CURRENT").exists():
            rt = Runtime.from_pretrained(args.model)
            t = time.perf_counter()
            info = rt.load_document(text)
            rt.save_session(args.session)
            ingest_s = time.perf_counter() - t
            console.print(f"ingested {info['tokens']} tokens in {ingest_s:.1f}s -> {args.session}")
            del rt
        t = time.perf_counter()
        rt = Runtime.load_session(args.session, model=args.model)
        load_s = time.perf_counter() - t
        if rt.document is None or rt.document["text"] != text:
            raise OffloadError(f"{args.session} holds another document; give a new --session")
        results = []
        for item in questions:
            t = time.perf_counter()
            first = None
            pieces = []
            for step in rt.stream_ask(item["question"], max_new_tokens=args.max_new_tokens):
                if first is None:
                    first = time.perf_counter() - t
                pieces.append(step.text)
            answer = "".join(pieces).strip()
            gold = item.get("answers") or []
            correct = any(g.lower() in answer.lower() for g in gold) if gold else None
            results.append({"question": item["question"], "answer": answer, "gold": gold, "correct": correct,
                            "ttft_seconds": first, "prefill_tokens": rt.stats()["prefill_tokens"]})  # fmt: skip
        reingest_s = None
        if args.compare_reingest:
            fresh = Runtime(rt.loaded, rt.config, rt.device)
            t = time.perf_counter()
            fresh.load_document(text)
            fresh.ask(questions[0]["question"], max_new_tokens=1)
            reingest_s = time.perf_counter() - t
    except (OffloadError, StorageError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)

    table = Table(
        title=f"{args.session} ({len(rt._document_ids())} document tokens, session loaded in {load_s:.2f}s)"
    )
    for col in ("question", "answer", "correct", "TTFT s"):
        table.add_column(col, overflow="fold")
    for r in results:
        mark = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r["correct"]]
        table.add_row(r["question"], r["answer"][:80], mark, f"{r['ttft_seconds']:.2f}")
    console.print(table)
    graded = [r for r in results if r["correct"] is not None]
    summary = {"questions": len(results), "load_seconds": load_s,
               "mean_ttft_seconds": sum(r["ttft_seconds"] for r in results) / len(results)}  # fmt: skip
    if graded:
        summary["accuracy"] = sum(r["correct"] for r in graded) / len(graded)
    if ingest_s is not None:
        summary["ingest_seconds"] = ingest_s
    if reingest_s is not None:
        summary["reingest_to_first_token_seconds"] = reingest_s
        summary["ttft_ratio"] = summary["mean_ttft_seconds"] / reingest_s
    console.print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
