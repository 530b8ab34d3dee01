"""The int4 kernels (offload/kernels/int4.py) on this GPU, at the block linears' shapes
of the 8B and 14B models: a decode step's matmul (one row) against the bfloat16 matmul
of the same weight (cuBLAS), under other launch settings (outputs a program, groups a
step, warps), each checked against the reference and timed as a CUDA graph of 20 calls
replayed, as the decode step runs it; and a prefill chunk's dequantization of the
largest linear against its torch reference. The read rate (GB/s) is the weight's bytes
over the time: a step at batch 1 is bound by it.

    python scripts/bench_int4.py [--quick] [--out results/bench_int4.json]

Needs a CUDA GPU (or tests/emulated_run.py, with --quick: the default setting, a tiny
shape, timed once). `--quick` rows say nothing of speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep_selection  # noqa: E402
from evalkit import SHAPES, row_error, write_json  # noqa: E402
from sweep_selection import graph_us, product, with_settings  # noqa: E402

from offload.kernels import int4 as K  # noqa: E402
from offload.kernels import interpreted  # noqa: E402
from offload.quantize import INT4_BYTES  # noqa: E402


def linears(shape: str) -> dict[str, tuple[int, int]]:
    """(outputs, inputs) of each block linear of a model of evalkit's SHAPES, the fused
    ones as the runtime fuses them."""
    s = SHAPES[shape]
    dim, q, kv, hidden = (
        s["dim"],
        s["num_heads"] * s["head_dim"],
        s["num_kv_heads"] * s["head_dim"],
        s["hidden_dim"],
    )
    return {
        "qkv": (q + 2 * kv, dim),
        "o": (dim, q),
        "gate_up": (2 * hidden, dim),
        "down": (dim, hidden),
    }


QUICK = {"tiny": {"gate_up": (96, 64)}}
SETTINGS = product(BLOCK_N=(K.BLOCK_N, 16, 64), BLOCK_G=(K.BLOCK_G, 4, 16), WARPS=(K.WARPS, 8))


def weight(n: int, k: int, g: torch.Generator) -> tuple:
    nibbles = torch.randint(0, 256, (n, k // K.GROUP, K.GROUP // 2), generator=g,
                            device="cuda", dtype=torch.uint8)  # fmt: skip
    scale = (torch.rand(n, k // K.GROUP, generator=g, device="cuda") * 0.02).half()
    lo = (torch.randn(n, k // K.GROUP, generator=g, device="cuda") * 0.1).half()
    return nibbles, scale, lo


def linear_rows(model: str, name: str, n: int, k: int, settings: list[dict]) -> list[dict]:
    g = torch.Generator("cuda").manual_seed(n + k)
    w = weight(n, k, g)
    x = torch.randn(1, k, generator=g, device="cuda").to(torch.bfloat16)
    dense = K.dequantize_ref(*w).to(torch.bfloat16)
    want = K.int4_matmul_ref(x, *w)
    base = {"model": model, "linear": name, "N": n, "K": k}
    rows = [{**base, "kernel": "bf16 matmul (cuBLAS)",
             "us": graph_us(lambda: torch.nn.functional.linear(x, dense))}]  # fmt: skip
    for setting in settings:
        row = {**base, "kernel": "int4_matmul", **setting}
        try:
            got = with_settings(K, setting, lambda: K.int4_matmul(x, *w))
            row["equal"] = bool(torch.allclose(got.float(), want.float(), rtol=2**-7, atol=2**-6))
            row["us"] = with_settings(K, setting, lambda: graph_us(lambda: K.int4_matmul(x, *w)))
        except Exception as e:  # (a setting that fails to compile must not cost the rest)
            row.update(row_error(e))
        rows.append(row)
    for row in rows:
        if "us" in row:
            bytes_read = n * k * (2 if row["kernel"].startswith("bf16") else INT4_BYTES)
            row["GB/s"] = round(bytes_read / row["us"] / 1e3, 1)
    return rows


def dequantize_rows(model: str, n: int, k: int) -> list[dict]:
    g = torch.Generator("cuda").manual_seed(n)
    w = weight(n, k, g)
    base = {"model": model, "linear": "gate_up", "N": n, "K": k}
    kernel = K.dequantize(*w, torch.bfloat16)
    ref = K.dequantize_ref(*w).to(torch.bfloat16)
    # (equal on a GPU; the interpreter truncates to bfloat16 where a GPU rounds)
    equal = (
        torch.allclose(kernel, ref, rtol=2**-7, atol=0)
        if interpreted()
        else torch.equal(kernel, ref)
    )
    return [
        {**base, "kernel": "dequantize (Triton)", "equal": bool(equal),
         "us": graph_us(lambda: K.dequantize(*w, torch.bfloat16))},
        {**base, "kernel": "dequantize (torch reference)",
         "us": graph_us(lambda: K.dequantize_ref(*w).to(torch.bfloat16))},
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny shape, one setting, timed once")
    p.add_argument("--out", type=Path, default=Path("results/bench_int4.json"))
    a = p.parse_args()
    if a.quick:
        sweep_selection.CALLS = sweep_selection.REPLAYS = 1
    console = Console()
    shapes = QUICK if a.quick else {m: linears(m) for m in ("llama-8b", "qwen-14b")}
    settings = SETTINGS[:1] if a.quick else SETTINGS
    results = {"device": torch.cuda.get_device_name(), "rows": [], "best": {}}
    for model, linears in shapes.items():
        for name, (n, k) in linears.items():
            try:
                rows = linear_rows(model, name, n, k, settings)
            except Exception as e:
                rows = [{"model": model, "linear": name, **row_error(e)}]
            for row in rows:
                console.print(row)
            results["rows"] += rows
            best = min((r for r in rows if r.get("equal")), key=lambda r: r["us"], default=None)
            if best is not None:
                results["best"][f"{model} {name}"] = best
            write_json(console, a.out, results)  # after every linear: a cut run keeps them
        n, k = linears["gate_up"]
        rows = dequantize_rows(model, n, k)
        for row in rows:
            console.print(row)
        results["rows"] += rows
        write_json(console, a.out, results)


if __name__ == "__main__":
    main()
