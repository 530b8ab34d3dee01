"""The Triton kernels compiled for the GPUs this runtime is for, on any machine.

The interpreter tests (tests/test_decode_step.py, tests/test_step_cache.py) check what
the kernels compute. This compiles every launch a decode step makes, with the argument
types and constants the runtime passes at the shapes of the embedded model and of an
8B model at 128k tokens (and its largest linear at int4), for an RTX 4090 (sm_89) and an H100 (sm_90), and checks what
only such a GPU would show: shared memory past what a block may use (the launch fails)
and registers spilled to local memory (slow). No GPU is needed: Triton compiles for a
named target and ships the `ptxas` that makes the cubin. It runs
`scripts/kernel_report.py` in a process of its own, since the interpreter the other
tests use (TRITON_INTERPRET) cannot compile.
"""

import json
import os
import subprocess
import sys

import torch

from offload.kernels.aot import SHARED_LIMIT, runtime_launches
from offload.kernels.decode_attention import launch_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_launch_compiles_within_the_gpus_limits(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "kernel_report.py"),
           "--archs", "89,90", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FP_FUSION" not in done.stderr, done.stderr[-3000:]  # (below)
    rows = json.loads(out.read_text())
    # every kernel, for both GPUs, in each dtype, at both models' shapes
    # (a kernel launched twice is named with its pass: "(candidates, pass 2)")
    kernels = {r["launch"].rsplit("(", 1)[1].split(",")[0].rstrip(")") for r in rows}
    assert kernels == {
        "split", "combine", "gather", "clusters", "take", "top", "top_pass", "top_list",
        "candidates", "score", "softmax_sum", "lookup", "successors", "norm", "rope", "silu_mul",
        "nearest", "int4_matmul", "int4_dequantize",
    }  # fmt: skip
    assert any(r["launch"].endswith("(candidates, pass 2)") for r in rows)
    assert len({(r["arch"], r["dtype"]) for r in rows}) == 6
    assert {r["launch"].split(":")[0] for r in rows} == {"smollm2-135m", "llama-3.1-8b"}
    for r in rows:
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
        assert r["spill_bytes"] == 0, r


def test_every_kernel_launch_says_whether_its_products_fuse():
    """Triton 3.9 warns once a process (on a user's stderr, at the first prompt on a GPU)
    where a launch leaves FP fusion to its default, and 3.10 turns that default off: each
    launch names it (`offload.kernels.FP_FUSION`; the int4 dequantization off)."""
    for arch in (89, 90):
        for what, launch in runtime_launches(torch.float16, arch):
            assert isinstance(launch.kwargs.get("enable_fp_fusion"), bool), what


def test_float32_attention_at_head_dim_128_takes_fewer_stages_on_a_4090():
    """Triton's default 3 stages need 143 KiB of shared memory there (measured by
    compiling), past the 4090's 99 KiB; an H100 has room for them."""
    assert launch_config(128, 4, SHARED_LIMIT[89]) == (8, 2)
    assert launch_config(128, 4, SHARED_LIMIT[90]) == (8, 3)
    assert launch_config(128, 2, SHARED_LIMIT[89]) == (4, 3)  # 16-bit: as Triton's default
