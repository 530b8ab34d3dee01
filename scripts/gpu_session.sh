#!/usr/bin/env bash
# Everything a session with a lent GPU should check (docs/gpu.md): the suite on CUDA and
# the GPU benchmark in its short form, in two parts that fit the two device calls a
# session makes anyway (the embedded model's halves travel in separate calls). Results go
# to $OUT (the device tool's folder) or results/gpu. On an offline machine prepared with
# ../shared/gpu/prepare-carry.sh, start each command with `source .dev/setup.sh;`.
#
#   bash scripts/gpu_session.sh 1   # carry .dev/model-a: the suite's files that do not
#                                   # load the embedded model, then the 8B-shaped model's
#                                   # decode and prefill rows (about 230 s)
#   bash scripts/gpu_session.sh 2   # carry .dev/model-b within 30 s: the embedded model's
#                                   # test files, its rows, the sessions, the probes (450 s)
#   bash scripts/gpu_session.sh     # both, on a machine that has the model already
#
# A lent GPU has 15 minutes of device time in all, its start included. Each step has its
# own time limit and writes its output to the results as it goes, so a step cut short
# (or a call stopped at the device time left) still brings back what it saw; pytest is
# stopped with SIGINT, on which it still prints the failures it has seen. The tests run
# in worker processes (pytest-xdist, on the GPU machine's image), 6 at a time. At most 8
# files come back from a device call: each part writes 8 or fewer.
set -uo pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
part=${1:-all}
# The files that load the embedded model (its fixtures, its file or its tokenizer).
model_files="test_cli test_config test_decode_step test_embedded test_errors test_kernel_compile
  test_gpu_scripts test_session_trust test_sessions test_sparse_e2e test_tiered_step"

suite() {  # suite NAME SECONDS FILES...
  local name=$1 seconds=$2
  shift 2
  local workers=()
  python -c "import xdist" 2>/dev/null && workers=(-n 6)
  OMP_NUM_THREADS=2 timeout -s INT -k 10 "$seconds" python -m pytest -q "${workers[@]}" -p no:cacheprovider -rfEs \
    --durations=25 "$@" >"$out/pytest-$name.txt" 2>&1
  tail -40 "$out/pytest-$name.txt"
}

bench() {  # bench NAME SECONDS ARGS...
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" python scripts/bench_gpu.py --tokens 16 --out "$out/bench-$name.json" \
    --plot "/tmp/bench-$name.png" "$@" >"$out/bench-$name.txt" 2>&1
  tail -25 "$out/bench-$name.txt"
}

if [ "$part" != 2 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/gpu.txt"
  files=()
  for f in tests/test_*.py; do
    case " $(echo $model_files) " in *" $(basename "$f" .py) "*) ;; *) files+=("$f") ;; esac
  done
  suite 1 100 "${files[@]}"
  # The targets first: the offloaded preset at 128k (prefilled layer by layer; its 8k row
  # warms the kernels), the KV on the device at 8k.
  bench 1 110 --systems offloaded,device --lengths 8192,131072 --fill-above 131072
fi
if [ "$part" != 1 ]; then
  files=()
  for f in $model_files; do files+=("tests/$f.py"); done
  suite 2 150 "${files[@]}"
  bench 2 130 --systems embedded,embedded-torch-ops,session,tiered --lengths 8192 \
    --session-lengths 8192,131072 --fill-above 131072
  timeout 30 python scripts/probe_pinning.py --gib 2 --out "$out/probe_pinning.json" 2>&1 | tail -12
  timeout 40 python scripts/bench_selection.py --steps 30 --out "$out/bench_selection.json" 2>&1 | tail -8
  bench compiled 70 --systems embedded-compiled,device-compiled --lengths 8192
  timeout 25 python scripts/bench_step_host.py --steps 256 --out "$out/bench_step_host.json" 2>&1 | tail -12
fi
