#!/usr/bin/env bash
# Everything a session with a lent GPU should check, in one command (docs/gpu.md):
# the suite on CUDA, then the GPU benchmark in its short form. Results go to $OUT (the
# device tool's folder) or results/gpu. On an offline machine prepared with
# ../shared/gpu/prepare-carry.sh, start the command with `source .dev/setup.sh;`.
#
#   bash scripts/gpu_session.sh [pytest-seconds] [bench-seconds]
#
# A lent GPU has 15 minutes of device time in all (its start and the call that carries
# the first model half included): the defaults, 200 (and 10 to stop) + 40 + 180 + 45 + 75 +
# 35 s, fit one call (at most 600 s). The second part also says whether pinning on a thread stalls
# the main thread's GPU work (scripts/probe_pinning.py). The fourth part times one sparse
# layer's selection and hit-cache lookup with the Triton kernels, with their torch
# references, and with torch's topk for the tokens kept (scripts/bench_selection.py; its
# first launches compile the kernels); the fifth, the decode step through torch.compile
# (`model.compile_step`) beside the captured step of the third.
set -uo pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# The files of the CUDA-only tests and the kernels first, torch.compile's last (the
# slowest to compile), so that a suite cut short by the limit has run what matters most;
# SIGINT at the limit, on which pytest still prints the failures it has seen.
first="test_decode_step test_tiered_step test_step_syncs test_storage test_sessions test_device_index test_step_cache test_embedded test_device_budget test_sparse_prefill test_layer_kernels"
last="test_compiled_step test_kernel_compile"
files=()
for f in $first; do files+=("tests/$f.py"); done
for f in tests/test_*.py; do
  case " $first $last " in *" $(basename "$f" .py) "*) ;; *) files+=("$f") ;; esac
done
for f in $last; do files+=("tests/$f.py"); done
timeout -s INT -k 10 "${1:-200}" python -m pytest -q --maxfail=30 -rfEs --durations=15 \
  "${files[@]}" 2>&1 | tee "$out/pytest.txt" | tail -60
timeout 40 python scripts/probe_pinning.py --gib 2 --out "$out/probe_pinning.json" 2>&1 | tail -20
timeout "${2:-180}" python scripts/bench_gpu.py --lengths 8192,131072 --tokens 16 \
  --systems embedded,embedded-torch-ops,device,offloaded,tiered,session --fill-above 131072 \
  --session-lengths 8192,131072 --out "$out/bench_gpu.json" \
  --plot "$out/gpu_decode_ms_per_token.png" 2>&1 | tail -40
timeout 45 python scripts/bench_selection.py --steps 30 --out "$out/bench_selection.json" 2>&1 | tail -8
timeout 75 python scripts/bench_gpu.py --lengths 8192 --tokens 16 \
  --systems embedded-compiled,device-compiled --out "$out/bench_gpu_compiled.json" \
  --plot "$out/gpu_compiled.png" 2>&1 | tail -20
timeout 35 python scripts/bench_step_host.py --steps 256 --out "$out/bench_step_host.json" 2>&1 | tail -20
