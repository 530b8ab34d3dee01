"""Hit rate of the tiered decode step's device hit caches (offload/step_cache.py) on real
prose, and the host reads per token they leave: the figure that decides how much KV
crosses PCIe per token on a GPU.

    python scripts/eval_step_cache.py [--length 8000] [--tokens 48]
        [--budgets 0.02,0.05] [--hit-cache 2,4] [--reuse auto] [--texts ../shared/texts]
        [--out results/eval_step_cache.json]

The embedded model decodes `--tokens` tokens greedily after `--length` tokens of prose,
through the fixed-shape tiered step exactly as CUDA runs it (device-side cluster
selection reranked by the 2-bit summaries, hit caches, gather from the host slab),
here run eagerly with the kernels' torch references when there is no GPU. Speed is
not measured; the hit rate does not depend on the device. `--reuse on` as on CUDA
(`selection.reuse`: every other step reuses the last selection with the successors).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import prompt_ids  # noqa: E402
from evalkit import DEFAULT_TEXTS, prose, write_json  # noqa: E402

from offload import Runtime  # noqa: E402
from offload.backend import Backend  # noqa: E402
from offload.config import REUSE_MODES  # noqa: E402
from offload.generate import generate_steps, make_sampler  # noqa: E402
from offload.pipeline import PrefetchStats  # noqa: E402
from storage.tiered import TierReads  # noqa: E402


def measure(base: Runtime, ids: list[int], tokens: int, fraction: float, factor: float,
            reuse: str = "auto") -> dict:  # fmt: skip
    config = base.config.replace(mode="sparse", retrieve_fraction=fraction, retrieved=0,
                                 prefetch="cache", hit_cache=factor, reuse=reuse)  # fmt: skip
    rt = Runtime(base.loaded, config, base.device)
    cuda = rt.device.type == "cuda"
    rt.backend = Backend(rt.device, kernels=cuda, fixed_shape=True, graphs=cuda, remote_host=True)
    cache = rt.new_cache()
    tokenizer = dataclasses.replace(rt.tokenizer, stop_ids=())  # decode exactly N tokens
    steps = generate_steps(rt.model, cache, tokenizer, ids, tokens + 1, make_sampler(),
                           prefill_chunk=rt.config.generation.prefill_chunk)  # fmt: skip
    next(steps)  # the prefill (and the first token)
    cache.store.reads, cache.prefetcher.stats = TierReads(), PrefetchStats()
    for _ in steps:
        pass
    plan = cache.step.plan
    assert plan.steps == tokens, "every step should have run through the tiered step"
    hits = cache.prefetcher.stats.summary()
    out = {"budget": fraction, "hit_cache": factor, "reuse": cache.policy.reuse,
           "context": cache.num_tokens,
           "retrieved_per_head": cache.policy.stats.last_retrieved, "steps": plan.steps,
           "hit_rate": hits["hit_rate"],
           "host_read_bytes_per_token": cache.store.reads.nbytes["host"] / plan.steps}  # fmt: skip
    cache.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--length", type=int, default=8000)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--budgets", default="0.02,0.05")
    p.add_argument("--hit-cache", default="2,4")
    p.add_argument("--reuse", default="auto", choices=REUSE_MODES)
    p.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    p.add_argument("--out", type=Path, default=Path("results/eval_step_cache.json"))
    args = p.parse_args()
    console = Console()
    base = Runtime.from_pretrained("smollm2")
    ids = prompt_ids(base, prose(args.texts), args.length)
    results = {"length": args.length, "tokens": args.tokens, "rows": []}
    for fraction in (float(x) for x in args.budgets.split(",")):
        for factor in (float(x) for x in args.hit_cache.split(",")):
            row = measure(base, ids, args.tokens, fraction, factor, args.reuse)
            console.print(row)
            results["rows"].append(row)
            write_json(console, args.out, results)


if __name__ == "__main__":
    main()
