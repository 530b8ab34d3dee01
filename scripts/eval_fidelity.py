"""Attention-mass recall and perplexity of sparse decode against dense, on real prose.

    python scripts/eval_fidelity.py [--length 8192] [--budgets 0.02,0.05,0.1]
        [--selectors exact,summary,chunk,cluster] [--steps 8] [--ppl-tokens 256] [--reuse on]
        [--texts ../shared/texts] [--out results/eval_fidelity.json]

Recall: over `--steps` real decode steps after a prompt of `--length` tokens of
prose (less `--steps` where that would pass the model's context), the share of
the true (dense) softmax mass, per sparse layer and KV head (mean over its query
heads), that sink + window + selected tokens cover; the table gives the mean and
the 10th percentile over (step, layer, head).
Perplexity: the last `--ppl-tokens` tokens of a text of `--length` tokens,
decoded token by token after the rest, dense vs each selector and budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import (  # noqa: E402
    DEFAULT_TEXTS,
    PrefilledContext,
    dense_variant,
    prose,
    sparse_runtime,
    sparse_runtime_args,
    sparse_variants,
    write_json,
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sparse_runtime_args(ap)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--budgets", default="0.02,0.05,0.1")
    ap.add_argument("--selectors", default="exact,summary,chunk,cluster")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ppl-tokens", type=int, default=256)
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--out", type=Path, default=Path("results/eval_fidelity.json"))
    args = ap.parse_args()
    console = Console()
    rt = sparse_runtime(args)
    base = rt.config.selection
    text_ids = rt.tokenizer.encode(prose(args.texts))
    assert len(text_ids) >= args.length, f"need {args.length} tokens of text, have {len(text_ids)}"
    ids = text_ids[: args.length]
    budgets = [float(x) for x in args.budgets.split(",")]
    settings = [dense_variant(base), *sparse_variants(base, args.selectors.split(","), budgets)]
    results = []

    # Attention-mass recall over real decode steps after the text (cut so that every step
    # fits the model's context: decoding stops at max_seq_len).
    ctx = PrefilledContext(rt, ids[: rt.args.max_seq_len - args.steps])
    for name, budget, selection in settings[1:]:
        _, stats = ctx.decode(selection, args.steps, probe_recall=True)
        masses = torch.cat([m for _, m in stats.recall])
        by_layer = {}
        for layer, m in stats.recall:
            by_layer.setdefault(layer, []).append(m)
        r = {"selector": name, "budget": budget, "recall_mean": float(masses.mean()),
             "recall_p10": float(masses.quantile(0.1)),
             "recall_by_layer": {k: float(torch.cat(v).mean()) for k, v in sorted(by_layer.items())}}  # fmt: skip
        results.append(r)
        console.print({k: v for k, v in r.items() if k != "recall_by_layer"})
    ctx.close()

    # Perplexity of the text's last tokens.
    n = args.ppl_tokens
    ctx = PrefilledContext(rt, ids[: -n + 1] if n > 1 else ids)
    continuation = ids[-n + 1 :] + [text_ids[args.length]] if n > 1 else [text_ids[args.length]]
    for name, budget, selection in settings:
        ppl = ctx.perplexity(selection, continuation)
        match = next((r for r in results if r["selector"] == name and r["budget"] == budget), None)
        if match is None:
            match = {"selector": name, "budget": budget}
            results.append(match)
        match["perplexity"] = ppl
        console.print({"selector": name, "budget": budget, "perplexity": ppl})
    ctx.close()

    table = Table(
        title=f"fidelity at {args.length} tokens ({args.steps} decode steps, ppl over {n} tokens)"
    )
    for col in ("selector", "budget", "recall mean", "recall p10", "perplexity"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["selector"], "all" if r["selector"] == "dense" else f"{r['budget']:.0%}",
            f"{r['recall_mean']:.3f}" if "recall_mean" in r else "1.000",
            f"{r['recall_p10']:.3f}" if "recall_p10" in r else "1.000", f"{r['perplexity']:.3f}",
        )  # fmt: skip
    console.print(table)
    write_json(console, args.out, {"length": args.length, "results": results})


if __name__ == "__main__":
    main()
