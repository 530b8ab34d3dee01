"""What loading a quantized GGUF costs in host memory on the CPU: a random-weight Llama
of --layers x --dim (--ff) written as a GGUF with its block linears in --quant, then
loaded by a fresh process per row (`offload.loading.load`, the weight cache empty, then
again from the cache), its seconds and its peak resident memory once every page of the
weights has been read (as a decode step reads them).

    python scripts/probe_load_memory.py [--layers 16 --dim 2048 --ff 8192] [--quant Q4_0]
        [--weights auto,dense] [--out results/probe_load_memory.json]

The vocabulary is the 97 byte-level tokens of a test tokenizer, so the embedding and the
head are small: what is measured is the block linears (dense bf16: 2 bytes a weight; the
int4 form: 0.625).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import write_json  # noqa: E402

CHILD = """
import json, resource, sys, time, torch
from offload.loading import load
t = time.perf_counter()
m = load(sys.argv[1], torch.bfloat16, torch.device("cpu"), sys.argv[2]).model
seconds = time.perf_counter() - t
for x in m.state_dict().values():  # every page of the weights, as a decode step reads them
    x.contiguous().flatten().view(torch.uint8)[::4096].sum()
print(json.dumps({"seconds": seconds, "form": m.weights,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def write_model(path: Path, layers: int, dim: int, ff: int, quant: str) -> int:
    """The GGUF; returns the block linears' weights."""
    import gguf

    heads, kv, rng = dim // 128, max(1, dim // 512), np.random.default_rng(0)
    tokens = [chr(c) for c in range(33, 127)] + ["ab", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    kind, hd, count = gguf.GGMLQuantizationType[quant], 128, 0
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), dim), np.float32))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (heads * hd, dim)), ("attn_k", (kv * hd, dim)),
                            ("attn_v", (kv * hd, dim)), ("attn_output", (dim, heads * hd)),
                            ("ffn_gate", (ff, dim)), ("ffn_up", (ff, dim)),
                            ("ffn_down", (dim, ff))):  # fmt: skip
            x = rng.standard_normal(shape, np.float32) * 0.02
            w.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(x, kind), raw_dtype=kind)
            count += x.size
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(dim, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=8192)
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--weights", default="auto,dense")
    ap.add_argument("--out", type=Path, default=Path("results/probe_load_memory.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="offload-probe-load-") as tmp:
        path = Path(tmp) / "model.gguf"
        t = time.perf_counter()
        linears = write_model(path, args.layers, args.dim, args.ff, args.quant)
        print(f"{path.stat().st_size / 2**30:.2f} GiB GGUF, {linears / 1e9:.2f}B block-linear "
              f"weights ({args.quant}), written in {time.perf_counter() - t:.0f} s")  # fmt: skip
        for mode in args.weights.split(","):
            cache = Path(tmp) / f"cache-{mode}"
            for start in ("first (converts)", "second (the cache)"):
                env = {**os.environ, "OFFLOAD_CACHE": str(cache)}
                out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], env=env,
                                     capture_output=True, text=True, check=True)  # fmt: skip
                row = {"weights": mode, "start": start, **json.loads(out.stdout.splitlines()[-1])}
                print(json.dumps(row))
                rows.append(row)
    write_json(Console(), args.out, {"args": {k: str(v) for k, v in vars(args).items()},
                          "block_linear_weights": linears, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
