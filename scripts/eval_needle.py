"""Needle in a haystack: context lengths x depths x budgets x selectors, against dense.

    python scripts/eval_needle.py [--lengths 2048,4096,8000] [--depths 0.1,0.3,0.5,0.7,0.9]
        [--budgets 0.02,0.05,0.1] [--selectors exact,summary,chunk,cluster]
        [--texts ../shared/texts] [--reuse on] [--out results/eval_needle.json]

Filler is real prose (../shared/texts) cut to each length; the needle is "The secret
passphrase is <two words>." at each depth; the answer is primed with "The secret
passphrase is". Each prompt is prefilled once; dense and every sparse setting then
decode from the same KV. Budgets are the retrieved share of the context per KV
head, on top of sink (16) and window (256).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import (  # noqa: E402
    DEFAULT_TEXTS,
    PASSPHRASES,
    PrefilledContext,
    dense_variant,
    needle_prompt,
    prose,
    sparse_runtime,
    sparse_runtime_args,
    sparse_variants,
    write_json,
)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sparse_runtime_args(ap)
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--budgets", default="0.02,0.05,0.1")
    ap.add_argument("--selectors", default="exact,summary,chunk,cluster")
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/eval_needle.json"))
    args = ap.parse_args()
    console = Console()
    rt = sparse_runtime(args)
    base = rt.config.selection
    filler = prose(args.texts)
    selectors, budgets = args.selectors.split(","), floats(args.budgets)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        for i, depth in enumerate(floats(args.depths)):
            phrase = PASSPHRASES[i % len(PASSPHRASES)]
            ids = needle_prompt(rt, filler, length, depth, phrase)
            ctx = PrefilledContext(rt, ids)
            runs = [dense_variant(base), *sparse_variants(base, selectors, budgets)]
            for name, budget, selection in runs:
                tokens, _ = ctx.decode(selection, args.new_tokens)
                answer = rt.tokenizer.decode(tokens)
                row = {"length": length, "prompt_tokens": len(ids), "depth": depth, "selector": name, "budget": budget,
                       "hit": phrase in answer, "answer": answer}  # fmt: skip
                rows.append(row)
                console.print(row)
            ctx.close()

    table = Table(title="needle retrieved (hits / depths)")
    for col in ("length", "selector", "budget", "hits"):
        table.add_column(col, justify="right")
    keys = sorted(
        {(r["length"], r["selector"], r["budget"]) for r in rows},
        key=lambda k: (k[0], k[1] != "dense", k[1], k[2]),
    )
    for key in keys:
        group = [r for r in rows if (r["length"], r["selector"], r["budget"]) == key]
        hits = sum(r["hit"] for r in group)
        label = "dense" if key[1] == "dense" else f"{key[2]:.0%}"
        table.add_row(str(key[0]), key[1], label, f"{hits}/{len(group)}")
    console.print(table)
    write_json(console, args.out, {"rows": rows})


if __name__ == "__main__":
    main()
