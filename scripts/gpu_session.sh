#!/usr/bin/env bash
# Everything a session with a lent GPU should check (docs/gpu.md): the suite on CUDA and
# the GPU benchmark in its short form, in two parts that fit the two device calls a
# session makes anyway (the embedded model's halves travel in separate calls). Results go
# to $OUT (the device tool's folder) or results/gpu. On an offline machine prepared with
# ../shared/gpu/prepare-carry.sh and scripts/gpu_wheels.sh, start each command with
# `source .dev/setup.sh;`.
#
#   bash scripts/gpu_session.sh 1   # carry .dev/setup.sh .dev/whl .dev/model-a: the
#                                   # selection kernels' launch settings, the 8B-shaped
#                                   # model's decode and prefill rows with the fastest of
#                                   # them (the targets), then the suite's files that need
#                                   # neither the embedded model nor the project's wheels
#                                   # the GPU image lacks (385 s at most)
#   bash scripts/gpu_session.sh 2   # carry .dev/setup.sh .dev/model-b .dev/whl2 within
#                                   # 30 s: the sessions (the 128k one profiled after its
#                                   # own figures), the embedded model's rows, then the
#                                   # other files (470 s at most)
#   bash scripts/gpu_session.sh int4   # with device time left after the two parts: the
#                                   # int4 kernels against bf16 matmuls, then the int4
#                                   # weights' decode (8B shape at 8k, beside part 1's dense
#                                   # row; the 14B shape, whose dense weights would not fit
#                                   # a 24 GB card) (210 s; not run on a GPU yet)
#   bash scripts/gpu_session.sh     # both, and the probes, the compiled step (measured
#                                   # on 2026-12-04: docs/gpu.md) and int4, on a machine
#                                   # that has everything already
#   bash scripts/gpu_session.sh suite2 bench2 ...   # named steps (below)
#
# A lent GPU has 15 minutes of device time in all, its start included: the two parts take
# 855 s at most (on 2026-12-04 they took 151 and 323 s, the start 30), the targets
# before the suite in each. Each step has its own time limit and writes its output to
# the results as it goes, so a step cut short (or a call stopped at the device time
# left) still brings back what it saw; pytest is stopped with SIGINT, on which it still
# prints the failures it has seen. The tests run
# in worker processes (pytest-xdist, on the GPU machine's image), 6 at a time. At most 8
# files come back from a device call: each part writes 8 or fewer.
set -uo pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case "${1:-all}" in
  1) steps="info sweep bench1 suite1" ;;
  2) steps="bench2 suite2" ;;
  all) steps="info sweep bench1 suite1 bench2 suite2 probes compiled int4" ;;
  *) steps="$*" ;;
esac
# The project's wheels that the GPU image lacks (scripts/gpu_wheels.sh), once per machine.
if [ -d .dev/whl2 ] && [ ! -d /tmp/site/pydantic ]; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .dev/whl2/*.whl
fi
# The files that load the embedded model (its fixtures, its file or its tokenizer) or
# import what needs those wheels (pydantic: sessions; prompt_toolkit: the chat).
second="test_cli test_config test_cuda_journeys test_decode_step test_device_budget test_embedded
  test_errors test_fuzz test_generate test_gpu_scripts test_kernel_compile test_pipeline
  test_session_format test_session_trust test_session_warm test_sessions test_sparse_e2e
  test_tiered_step"

suite() {  # suite NAME SECONDS FILES...
  local name=$1 seconds=$2
  shift 2
  local workers=()
  python -c "import xdist" 2>/dev/null && workers=(-n 6 --maxprocesses 6)
  OMP_NUM_THREADS=2 timeout -s INT -k 10 "$seconds" python -m pytest -q "${workers[@]}" \
    -p no:cacheprovider -rfEs --durations=25 "$@" >"$out/pytest-$name.txt" 2>&1
  tail -40 "$out/pytest-$name.txt"
}

bench() {  # bench NAME SECONDS ARGS...
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" python scripts/bench_gpu.py --tokens 16 --out "$out/bench-$name.json" \
    --plot "/tmp/bench-$name.png" "$@" >"/tmp/bench-$name.txt" 2>&1
  tail -25 "/tmp/bench-$name.txt"
}

for step in $steps; do
  case $step in
    info)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
      python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$out/gpu.txt" ;;
    suite1)
      files=()
      for f in tests/test_*.py; do
        case " $(echo $second) " in *" $(basename "$f" .py) "*) ;; *) files+=("$f") ;; esac
      done
      suite 1 100 "${files[@]}" ;;
    suite2)
      files=()
      for f in $second; do files+=("tests/$f.py"); done
      suite 2 220 "${files[@]}" ;;
    bench1)  # the targets: the offloaded preset at 128k (prefilled layer by layer; its
      # 8k row warms the kernels; its rows' without_reuse: the same steps, each
      # selecting), the KV on the device at 8k; with the fastest launch settings the
      # sweep found, where it ran before
      bench 1 135 --systems offloaded,device --lengths 8192,131072 --fill-above 131072 \
        --kernel-settings "$out/sweep_selection.json" ;;
    bench2)  # the sessions first (the 128k one's question asked at once: a target), each
      # then loaded and asked again under cProfile; then the embedded model (a target)
      bench 2 200 --systems session,tiered --lengths 8192 --session-lengths 8192,131072 \
        --fill-above 131072 --profile-question
      bench embedded 50 --systems embedded,embedded-torch-ops ;;
    sweep)
      timeout 150 python scripts/sweep_selection.py --out "$out/sweep_selection.json" 2>&1 | tail -40 ;;
    probes)
      timeout 30 python scripts/probe_pinning.py --gib 2 --out "$out/probe_pinning.json" 2>&1 | tail -12
      timeout 40 python scripts/bench_selection.py --steps 30 --out "$out/bench_selection.json" 2>&1 | tail -8
      timeout 25 python scripts/bench_step_host.py --steps 256 --out "$out/bench_step_host.json" 2>&1 | tail -12
      timeout 60 python scripts/probe_host_budget.py --out "$out/probe_host_budget.json" 2>&1 | tail -12 ;;
    compiled)
      bench compiled 70 --systems embedded-compiled,device-compiled --lengths 8192 ;;
    int4)  # docs/gpu.md, "Int4 weights on CUDA": the kernels' settings, then the models
      timeout 60 python scripts/bench_int4.py --out "$out/bench_int4.json" 2>&1 | tail -12
      bench int4 80 --systems device-int4,offloaded-int4 --lengths 8192
      bench int4-14b 70 --shape qwen-14b --systems device-int4 --lengths 8192 ;;
    *) echo "gpu_session.sh: unknown step $step" >&2 ;;
  esac
done
