"""What running a GGUF's linears at int4 or int8 on the CPU costs in perplexity: the
embedded model rewritten with its block linears at each of --types (from its own weights,
dequantized), then the perplexity of the first --tokens tokens of real prose (by one
prefill's logits) with the weights dense and as `model.weights = "auto"` runs them.

    python scripts/eval_weight_forms.py [--types Q8_0,Q5_0,Q4_0] [--tokens 2048]
        [--texts ../shared/texts] [--out results/eval_weight_forms.json]

Q4_1 is the file's own type (`auto`: int4 with its codes). gguf quantizes Q4_0, Q4_1,
Q5_0, Q5_1 and Q8_0; a tensor it cannot take at a type stays as it was.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import DEFAULT_TEXTS, prose, write_json  # noqa: E402

from offload import Runtime  # noqa: E402
from offload.loading import resolve_source  # noqa: E402


def rewrite(reader, path: Path, kind) -> None:
    """The GGUF of `reader` again at `path`, its block linears quantized to `kind`."""
    import gguf

    V = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), "llama")
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kinds = f.types
        if kinds[0] == V.ARRAY:
            items = [f.parts[i] for i in f.data]
            value = ([bytes(x).decode("utf-8", "surrogateescape") for x in items]
                     if kinds[-1] == V.STRING else [x.tolist()[0] for x in items])  # fmt: skip
            w.add_key_value(name, value, kinds[0], sub_type=kinds[-1])
        elif kinds[0] == V.STRING:
            w.add_key_value(name, bytes(f.parts[f.data[0]]).decode("utf-8"), kinds[0])
        else:
            w.add_key_value(name, f.parts[f.data[0]].tolist()[0], kinds[0])
    for t in reader.tensors:
        x = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name.startswith("blk.") and x.ndim == 2 and x.shape[1] % 32 == 0:
            w.add_tensor(t.name, gguf.quants.quantize(x, kind), raw_dtype=kind)
        else:
            w.add_tensor(t.name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def perplexity(rt: Runtime, ids: list[int]) -> float:
    logits = rt.logits(ids).float()
    picked = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
    return math.exp(-picked.mean().item())


def main() -> None:
    import gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,Q5_0,Q4_0")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--texts", type=Path, default=DEFAULT_TEXTS)
    ap.add_argument("--out", type=Path, default=Path("results/eval_weight_forms.json"))
    args = ap.parse_args()
    console = Console()
    source = resolve_source("smollm2")
    reader = gguf.GGUFReader(source)
    rows = []
    with tempfile.TemporaryDirectory(prefix="offload-weight-forms-") as tmp:
        os.environ["OFFLOAD_CACHE"] = str(Path(tmp) / "cache")
        files = {"Q4_1 (the file)": source}
        for name in args.types.split(","):
            files[name] = Path(tmp) / f"{name}.gguf"
            rewrite(reader, files[name], gguf.GGMLQuantizationType[name])
        ids = None
        for name, path in files.items():
            for mode in ("dense", "auto"):
                rt = Runtime.from_pretrained(path, weights=mode, device="cpu")
                ids = ids or rt.tokenizer.encode(prose(args.texts))[: args.tokens]
                rows.append({"stored as": name, "weights": mode, "form": rt.model.weights,
                             "perplexity": perplexity(rt, ids)})  # fmt: skip
                console.print(rows[-1])
    table = Table(title=f"perplexity of {len(ids)} tokens of prose, embedded model, CPU")
    for col in ("stored as", "dense", "auto (form)", "change"):
        table.add_column(col)
    for dense, auto in zip(rows[::2], rows[1::2], strict=True):
        change = auto["perplexity"] / dense["perplexity"] - 1
        table.add_row(dense["stored as"], f"{dense['perplexity']:.3f}",
                      f"{auto['perplexity']:.3f} ({auto['form']})", f"{change:+.2%}")  # fmt: skip
    console.print(table)
    write_json(console, args.out, {"args": {k: str(v) for k, v in vars(args).items()},
                                   "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
