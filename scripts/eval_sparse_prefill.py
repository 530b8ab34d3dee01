"""Fidelity and host reads of sparse prefill chunks: a prompt after a long context whose
KV is not in place (CUDA; a CPU's layers spilled to disk) attends exactly to sink + the
window before it + itself, and to one selection for the whole chunk in the far range.

    python scripts/eval_sparse_prefill.py [--length 8000] [--depths 0.1,0.3,0.5,0.7,0.9]
        [--budgets 0.02,0.05] [--ppl-context 7168] [--ppl-tokens 1024] [--ppl-chunk 512]
        [--texts ../shared/texts] [--out results/eval_sparse_prefill.json]

Questions: the needle prompts of eval_needle.py, the document prefilled once (exactly)
and the question's last tokens (from "What is the secret passphrase?" to the primed
answer) prefilled as one chunk after it, then 4 tokens decoded; variants:
  dense          everything dense (mode "dense")
  dense-chunk    the question dense, decode sparse (what the CPU does in place)
  sparse-chunk   the question sparse, decode sparse (what CUDA does now)
Per variant: needle hits, first answer token equal to dense's, KL(dense || variant) of
the first answer token's distribution, the host bytes the question's prefill read, and
the share of a sparse layer's chunks its selection touched (what a question on a
session still on disk reads from it).
Perplexity: the `--ppl-tokens` tokens after `--ppl-context` tokens of prose, prefilled in
chunks of `--ppl-chunk` (teacher forcing), dense and sparse.

The embedded model, on this machine's device; "not in place" is forced on a CPU, as
tests/test_sparse_prefill.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import (  # noqa: E402
    DEFAULT_TEXTS,
    PASSPHRASES,
    PrefilledContext,
    needle_prompt,
    prose,
    write_json,
)

from offload import Runtime  # noqa: E402
from offload.generate import generate_steps  # noqa: E402
from storage.tiered import TieredStore  # noqa: E402

QUESTION = "\nWhat is the secret passphrase?"


@contextlib.contextmanager
def remote_host(on: bool):
    """Dense attention cannot read the host tier in place (as on CUDA) while `on`."""
    saved = TieredStore.in_place
    if on:
        TieredStore.in_place = lambda self, layer: False
    try:
        yield
    finally:
        TieredStore.in_place = saved


def variants(base, budgets):
    out = [("dense", 1.0, dataclasses.replace(base, mode="dense"), False)]
    for b in budgets:
        sel = dataclasses.replace(base, mode="sparse", retrieved=0, retrieve_fraction=b)
        out += [("dense-chunk", b, sel, False), ("sparse-chunk", b, sel, True)]
    return out


def question_split(rt: Runtime, ids: list[int]) -> int:
    """Where the question's last occurrence starts in `ids` (the tail prefilled after)."""
    q = rt.tokenizer.encode(QUESTION)
    for start in range(len(ids) - len(q), -1, -1):
        if ids[start : start + len(q)] == q:
            return start
    raise ValueError("the question is not in the prompt")


def ask(ctx: PrefilledContext, tail: list[int], selection, sparse_chunk: bool, passphrase: str):
    rt, cache = ctx.rt, ctx.cache
    policy = ctx.set_selection(selection)
    tok = dataclasses.replace(rt.tokenizer, stop_ids=())
    chunks = policy.stats.sparse_chunks
    touched = []  # per sparse layer: share of its chunks holding a selected token
    store, C = cache.store, cache.store.layout.chunk_size
    gather = store.gather_selected

    def probe(layer, ids):
        touched.append(torch.unique(ids // C).numel() / -(-store.lengths[layer] // C))
        return gather(layer, ids)

    store.gather_selected = probe
    with remote_host(sparse_chunk):
        reads = cache.store.reads.nbytes["host"]
        logits = []
        steps = generate_steps(rt.model, cache, tok, tail, 4,
                               lambda x: logits.append(x) or int(torch.argmax(x)))  # fmt: skip
        first = next(steps)
        tail_reads = cache.store.reads.nbytes["host"] - reads
        tail_touched = list(touched)
        tokens = [first.token_id] + [s.token_id for s in steps]
    del store.gather_selected
    ctx.rewind()
    text = rt.tokenizer.decode(tokens)
    return {"tokens": tokens, "hit": passphrase.split()[0] in text,
            "logprobs": torch.log_softmax(logits[0].float(), -1),
            "sparse_chunks": policy.stats.sparse_chunks - chunks, "tail_host_bytes": tail_reads,
            "tail_chunks_touched": sum(tail_touched) / max(len(tail_touched), 1)}  # fmt: skip


def questions(rt, args, console) -> list[dict]:
    filler = prose(args.texts)
    rows = []
    for i, depth in enumerate(args.depths):
        phrase = PASSPHRASES[i % len(PASSPHRASES)]
        ids = needle_prompt(rt, filler, args.length, depth, phrase)
        cut = question_split(rt, ids)
        ctx = PrefilledContext(rt, ids[:cut] + [0])  # prefills ids[:cut]
        ref = None
        for name, budget, sel, sparse_chunk in variants(rt.config.selection, args.budgets):
            r = ask(ctx, ids[cut:], sel, sparse_chunk, phrase)
            ref = ref or r
            kl = float((ref["logprobs"].exp() * (ref["logprobs"] - r["logprobs"])).sum())
            row = {"depth": depth, "variant": name, "budget": budget, "hit": r["hit"],
                   "first_equal": r["tokens"][0] == ref["tokens"][0], "kl": kl,
                   "sparse_chunks": r["sparse_chunks"], "tail_tokens": len(ids) - cut,
                   "context": len(ids), "tail_host_bytes": r["tail_host_bytes"],
                   "tail_chunks_touched": r["tail_chunks_touched"]}  # fmt: skip
            console.print(row)
            rows.append(row)
        ctx.close()
    return rows


def perplexity(rt, args, console) -> list[dict]:
    ids = rt.tokenizer.encode(prose(args.texts))[: args.ppl_context + args.ppl_tokens + 1]
    context, cont = ids[: args.ppl_context], ids[args.ppl_context :]
    ctx = PrefilledContext(rt, context + [0])
    rows = []
    for name, budget, sel, sparse_chunk in variants(rt.config.selection, args.budgets):
        if name == "dense-chunk":  # teacher-forced prefill: no decode step to differ in
            continue
        policy = ctx.set_selection(sel)
        chunks = policy.stats.sparse_chunks
        nll = 0.0
        with remote_host(sparse_chunk), torch.no_grad():
            for s in range(0, args.ppl_tokens, args.ppl_chunk):
                x = torch.tensor(cont[s : s + args.ppl_chunk][: args.ppl_tokens - s])
                y = torch.tensor(cont[s + 1 : s + 1 + len(x)])
                logp = torch.log_softmax(rt.model(x.to(rt.device), ctx.cache).float(), -1)
                nll -= float(logp.gather(1, y[:, None].to(logp.device)).sum())
        ctx.rewind()
        row = {"variant": name, "budget": budget, "ppl": math.exp(nll / args.ppl_tokens),
               "sparse_chunks": policy.stats.sparse_chunks - chunks}  # fmt: skip
        console.print(row)
        rows.append(row)
    ctx.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--length", type=int, default=8000)
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--budgets", default="0.02,0.05")
    p.add_argument("--ppl-context", type=int, default=7168)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--ppl-chunk", type=int, default=512)
    p.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    p.add_argument("--out", type=Path, default=Path("results/eval_sparse_prefill.json"))
    args = p.parse_args()
    args.depths = [float(x) for x in args.depths.split(",")]
    args.budgets = [float(x) for x in args.budgets.split(",")]
    console = Console()
    rt = Runtime.from_pretrained("smollm2", mode="sparse")
    results = {"length": args.length, "questions": questions(rt, args, console)}
    write_json(console, args.out, results)
    results["perplexity"] = perplexity(rt, args, console)
    write_json(console, args.out, results)
    summary = {}
    for r in results["questions"]:
        s = summary.setdefault((r["variant"], r["budget"]), [0, 0, 0.0, 0])
        s[0] += r["hit"]
        s[1] += r["first_equal"]
        s[2] += r["kl"]
        s[3] += 1
    for (name, budget), (hits, equal, kl, n) in summary.items():
        console.print(f"{name:13s} {budget:.2f}: hits {hits}/{n}, first token equal {equal}/{n}, "
                      f"mean KL {kl / n:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
