"""Prefill and decode speed on the embedded model, beside HF transformers in the same run.

    python scripts/bench_generate.py [--lengths 512,2048,8000] [--dtypes bfloat16,float32]
                                     [--decode-tokens 32] [--no-hf] [--out results/bench_generate.json]

Prompts are real prose from ../shared/texts when it exists (else generated filler),
cut to each length in tokens. Both systems decode exactly --decode-tokens tokens
(end-of-turn ignored), greedy. Prints a rich table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from offload import Runtime
from offload.generate import generate_steps, make_sampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import DEFAULT_TEXTS, bench_hf, prose  # noqa: E402


def prompt_ids(rt: Runtime, text: str, length: int) -> list[int]:
    head = rt.encode_prompt("Summarise the following text.\n\n")
    body = rt.tokenizer.encode(text)
    assert len(body) >= length, f"need {length} tokens of text, have {len(body)}"
    return head[:-5] + body[: length - len(head)] + head[-5:]


def bench_ours(rt: Runtime, ids: list[int], decode_tokens: int) -> dict:
    tokenizer = dataclasses.replace(rt.tokenizer, stop_ids=())  # decode exactly N tokens
    cache = rt.new_cache()
    steps = generate_steps(
        rt.model, cache, tokenizer, ids, decode_tokens + 1, make_sampler(),
        prefill_chunk=rt.config.generation.prefill_chunk,
    )  # fmt: skip
    results = list(steps)
    decode_s = sum(s.step_seconds for s in results[1:])
    return {
        "prefill_seconds": results[0].prefill_seconds,
        "prefill_tok_s": len(ids) / results[0].prefill_seconds,
        "decode_ms_per_token": 1000 * decode_s / (len(results) - 1),
        "decode_tok_s": (len(results) - 1) / decode_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="512,2048,8000")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    ap.add_argument("--out", type=Path, default=Path("results/bench_generate.json"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    console = Console()
    text = prose(args.texts)
    rows = []
    for dtype in args.dtypes.split(","):
        rt = Runtime.from_pretrained(args.model, dtype=dtype)
        hf = None
        if not args.no_hf:
            from transformers import AutoModelForCausalLM

            src = rt.loaded.source
            hf = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, dtype=getattr(torch, dtype)
            )
            hf.eval()
        for length in lengths:
            ids = prompt_ids(rt, text, length)
            runs = [("offload", bench_ours(rt, ids, args.decode_tokens))]
            if hf is not None:
                runs.append(("hf-transformers", bench_hf(hf, ids, args.decode_tokens)))
            for system, figures in runs:
                r = {"system": system, "dtype": dtype, "prompt_tokens": len(ids), **figures}
                rows.append(r)
                console.print(r)
        del rt, hf

    table = Table(title=f"prefill and decode, {args.model}, {torch.get_num_threads()} threads")
    for col in (
        "system",
        "dtype",
        "prompt",
        "prefill tok/s",
        "prefill s",
        "decode ms/tok",
        "decode tok/s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["system"], r["dtype"], str(r["prompt_tokens"]), f"{r['prefill_tok_s']:.0f}",
            f"{r['prefill_seconds']:.2f}", f"{r['decode_ms_per_token']:.1f}", f"{r['decode_tok_s']:.1f}",
        )  # fmt: skip
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine(), "decode_tokens": args.decode_tokens}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
