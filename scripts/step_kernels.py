"""How many kernels one decode step launches: the fixed-shape step as CUDA captures it,
counted on any machine (a random-weight model of `--shape`, the step run eagerly on
the CPU with the kernels' references).

    eager      torch operations that launch work (views left out; each Triton kernel one)
    compiled   what torch.compile makes of the same step (`model.compile_step`): fused
               kernels Inductor generates, and the calls it leaves as they are (matmuls,
               the Triton kernels). Inductor's CPU backend here: a
               proxy for what its CUDA backend fuses

On a GPU each launched kernel inside a replayed graph still costs a few microseconds,
so a step of thousands of small kernels is bound by their count, not by memory.

    python scripts/step_kernels.py [--shape tiny] [--out results/step_kernels.json]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

if not torch.cuda.is_available():  # the Triton kernels in the interpreter (one op each)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evalkit import SHAPES, synthetic_runtime, write_json  # noqa: E402

from offload.backend import Backend  # noqa: E402
from offload.config import RuntimeConfig  # noqa: E402
from offload.generate import prefill  # noqa: E402
from offload.kernels import layer as layer_kernels  # noqa: E402

VIEWS = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze",
         "squeeze", "t", "transpose", "permute", "as_strided", "alias", "detach", "unbind",
         "split", "chunk", "narrow", "_reshape_alias", "view_as", "empty", "new_empty",
         "empty_like"}  # fmt: skip


class Count(TorchDispatchMode):
    """Counts the operations that launch work; a Triton kernel's operator counts as one."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "offload":
            self.ops[name] += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return func(*args, **(kwargs or {}))
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def counted(self, name: str, kernel):
        """`kernel` (a Triton kernel's Python function), each call counted as one: it
        launches from Python, not through torch's dispatcher."""

        def call(*args):
            self.ops[name] += 1
            with torch.utils._python_dispatch._disable_current_modes():
                return kernel(*args)

        return call

    def layer_kernels(self) -> SimpleNamespace:
        """The layer's kernels (offload/kernels/layer.py) as the model calls them, counted."""
        kernels = vars(layer_kernels.KERNELS).items()
        return SimpleNamespace(**{n: self.counted(n, k) for n, k in kernels})


def compiled_counts(step) -> dict:
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(torch.compile(step._forward, dynamic=True))
    call = "\n".join(codes)
    call = call[call.index("def call(") :]
    fused = re.findall(r"^\s+(?:cpp_fused_\w+\(|triton_\w+\.run\()", call, re.M)
    kept = re.findall(r"^\s+(?:\w+ = )?(?:extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", call, re.M)
    return {"fused_kernels": len(fused), "kept_calls": len(kept)}


def measure(rt, tiered: bool, hit_factor: float | None) -> dict:
    cache = rt.new_cache()
    # the kernels as operators, as the compiled step calls them: the eager count then sees
    # each as one launch
    backend = Backend(rt.device, kernels=True, fixed_shape=True, remote_host=True, compile=True)
    if tiered:
        cache.mirror_dense_layers(rt.device)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rt.args.vocab_size, (600,), generator=gen).tolist()
    logits = prefill(rt.model, cache, ids, 256)
    cache.finish_prefill()
    cache.use_step(rt.model, backend, hit_factor)
    cache.step._block = None  # the blocks as written: counted, then compiled whole below
    token = int(logits.argmax())
    for _ in range(3):
        token = int(cache.decode(rt.model, token).argmax())
    step = cache.step
    assert step.plan.prepare(cache.num_tokens) is not None, "the step does not apply here"
    step.plan.token.fill_(token)
    step.plan.pos.fill_(cache.num_tokens)
    counter = Count()
    rt.model.use_ops(counter.layer_kernels())  # as on CUDA: the layer's norms, RoPE, SwiGLU
    rope_store = counter.counted("rope_store", layer_kernels.rope_store)  # (K/V writes too)
    with counter, mock.patch.object(Backend, "rope_store", lambda self, *args: rope_store(*args)):
        step._forward()
    rt.model.use_ops(backend.layer_ops)  # compiled: torch's operations, for Inductor to fuse
    out = {"eager_ops": sum(counter.ops.values()), **compiled_counts(step)}
    cache.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--out", type=Path, default=Path("results/step_kernels.json"))
    args = p.parse_args()
    from rich.console import Console

    console = Console()
    base = RuntimeConfig().replace(device="cpu", dtype="float32")
    dense = base.replace(mode="full")
    sparse = base.replace(mode="sparse", selector="cluster", sink=4, window=64, retrieved=32,
                          dense_layers=1, index_refresh=4096)  # fmt: skip
    layers = SHAPES[args.shape]["num_layers"]
    results = {"shape": args.shape, "layers": layers, "dense_layers": 1, "rows": []}
    cases = [("dense (KV on the device)", dense, False, None),
             ("tiered, no hit cache", sparse, True, None),
             ("tiered, hit caches (default)", sparse, True, 3.0)]  # fmt: skip
    for name, config, tiered, hit in cases:
        rt = synthetic_runtime(args.shape, 4096, config)
        row = {"step": name, **measure(rt, tiered, hit)}
        results["rows"].append(row)
        console.print(row)
    write_json(console, args.out, results)


if __name__ == "__main__":
    main()
