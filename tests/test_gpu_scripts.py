"""The benchmark scripts a session with a lent GPU runs (scripts/gpu_session.sh), run on
CUDA at the tiny shape: on a GPU as they are, elsewhere under emulated CUDA
(tests/emulated_run.py). GPU time is short; a script that fails there loses the rows
after it (a session loaded into the device cache once crashed bench_gpu.py so)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import EMULATED

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, out: Path) -> dict:
    on_gpu = torch.cuda.is_available() and not EMULATED
    runner = [sys.executable] if on_gpu else [sys.executable, "-m", "tests.emulated_run"]
    cmd = [*runner, f"scripts/{script}", *args, "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_gpu_rows_on_cuda(tmp_path):
    """Ours with the KV on the device (dense and int4 weights), tiered (the captured
    step), and a saved session asked at once (profiled) and after its read-in (at the
    tiny shape it fits the device cache); the preset changed by --set."""
    res = run_script(
        "bench_gpu.py", "--shape", "tiny", "--lengths", "384", "--tokens", "1", "--sustained", "2",
        "--systems", "device,tiered,session,device-int4", "--session-lengths", "256",
        "--session-dir", str(tmp_path / "sessions"), "--plot", str(tmp_path / "plot.png"),
        "--set", "hit_cache=3.0", "--profile-question", out=tmp_path / "bench_gpu.json",
    )  # fmt: skip
    rows = {r["system"]: r for r in res["rows"]}
    assert sorted(rows) == ["device", "device-int4", "session", "tiered"]
    assert len(res["rows"]) == 4
    assert not [r for r in rows.values() if "error" in r], res["rows"]
    assert rows["device"]["kv"] == "device" and rows["tiered"]["kv"] == "tiers"
    assert rows["tiered"]["captures"] >= 1 and rows["session"]["ttft_seconds"] > 0
    assert 0 < rows["tiered"]["reused_share"] <= 0.5  # (selection.reuse: on with CUDA)
    # then the same steps in the same cache: the reusing steps' rows in line (on CUDA the
    # side-stream fetch off), then with every step selecting
    assert rows["tiered"]["without_side_fetch"]["reused_steps"] > 0
    off = rows["tiered"]["without_reuse"]
    assert off["sustained_steps"] == 2 and off["reused_steps"] == 0
    assert "without_reuse" not in rows["device"]
    for r in (rows["device"], rows["tiered"]):  # the further steps, each waited for
        assert r["sustained_steps"] == 2 and 0 < r["step_ms_median"] <= r["step_ms_max"]
        assert r["sustained_ms_per_token"] <= r["step_ms_max"]
    assert res["set"] == {"hit_cache": "3.0"}
    assert "profile_error" not in rows["session"], rows["session"].get("profile_error")
    assert any("_first_token" in f for f in rows["session"]["question_profile"])
    assert any("load_state" in f for f in rows["session"]["load_profile"])
    # prefilled layer by layer: the GPU's idle time between layers, from the events
    assert rows["tiered"]["prefill_layers_ms"] > 0
    assert rows["tiered"]["prefill_between_layers_ms"] >= 0


def test_bench_selection_sweep_step_host_and_host_budget_on_cuda(tmp_path, monkeypatch):
    sel = run_script("bench_selection.py", "--tokens", "2048", "--steps", "1", "--retrieved",
                     "128", "--warmup", "1", out=tmp_path / "selection.json")  # fmt: skip
    assert [r["variant"] for r in sel["rows"]] == [
        "torch references", "Triton kernels", "Triton kernels, torch's topk for the tokens kept"
    ]  # fmt: skip
    assert all("error" not in r and r["ms_per_layer"] > 0 for r in sel["rows"]), sel["rows"]
    sweep = run_script("sweep_selection.py", "--tokens", "2048", "--retrieved", "128", "--quick",
                       out=tmp_path / "sweep.json")  # fmt: skip
    kernels = {r["kernel"] for r in sweep["rows"]}
    assert {"clusters", "take", "candidates", "rerank", "top", "fetch all"} <= kernels
    assert all(r["equal"] for r in sweep["rows"] if "variant" not in r), sweep["rows"]
    # bench_gpu.py --kernel-settings: the fastest settings set on the kernels' modules
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from sweep_selection import MODULES, apply_best

    for module in MODULES.values():  # (put back after the test)
        for key in [k for k in vars(module) if k.isupper()]:
            monkeypatch.setattr(module, key, getattr(module, key))
    applied = apply_best(tmp_path / "sweep.json")
    assert "BLOCK_CS" in applied and "BLOCK_K" in applied and "BLOCK_SPLIT" in applied
    assert "SPLIT_ABOVE" not in applied  # (each head split in the sweep's rows)
    assert MODULES["rerank"].BLOCK_N == applied["BLOCK_N"] == sweep["best"]["rerank"]["BLOCK_N"]
    # the int4 kernels: each checked against its reference, the bf16 matmul beside them
    int4 = run_script("bench_int4.py", "--quick", out=tmp_path / "int4.json")
    kinds = [r["kernel"] for r in int4["rows"]]
    assert kinds == ["bf16 matmul (cuBLAS)", "int4_matmul", "dequantize (Triton)",
                     "dequantize (torch reference)"], int4["rows"]  # fmt: skip
    assert all(r.get("equal", True) and r["us"] > 0 for r in int4["rows"]), int4["rows"]
    assert int4["best"]["tiny gate_up"]["kernel"] == "int4_matmul"
    # (3 layers: the preset's 2 dense ones and a sparse one)
    host = run_script("bench_step_host.py", "--tokens", "2048", "--layers", "3", "--steps", "2",
                      out=tmp_path / "host.json")  # fmt: skip
    assert host["steps"] == 2 and host["host_ms_per_token"] > 0
    assert any("(_hand_over)" in f for f in host["flush_step_profile"]), host["flush_step_profile"]
    assert any("(_update_indexes)" in f for f in host["index_step_profile"]), host
    assert 0 < host["hidden_ms_per_token"] < host["host_ms_per_token"]
    budget = run_script("probe_host_budget.py", "--tokens", "2048", "--selections", "1",
                        "--runs", "8", out=tmp_path / "budget.json")["rows"][0]  # fmt: skip
    assert budget["spilled_chunks"] > 0 and budget["disk_reads_mib"] > 0
    assert budget["slab_slots_after_selections_mib"] == budget["slab_slots_mib"]


def test_triton_compiles_times_what_lies_between_tritons_hooks(monkeypatch):
    """`evalkit.triton_compiles` (a first question's compiles, in bench_gpu.py's session
    rows): each compile timed from Triton's hook before it to its hook after, as Triton
    calls them (by keyword; the first must not return True, which skips the compile);
    the hooks the block found are put back."""
    from triton import knobs

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from evalkit import triton_compiles

    hooks = dict(key="k", repr="kernel", fn=None, compile={}, is_manual_warmup=False,
                 already_compiled=False)  # fmt: skip
    mine = knobs.runtime.jit_cache_hook
    with triton_compiles() as compiles:
        for _ in range(2):
            assert not knobs.runtime.jit_cache_hook(**hooks)
            knobs.runtime.jit_post_compile_hook(**hooks)
    assert compiles["compiled_kernels"] == 2 and compiles["compile_seconds"] > 0
    assert knobs.runtime.jit_cache_hook is mine
