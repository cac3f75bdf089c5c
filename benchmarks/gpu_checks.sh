#!/usr/bin/env bash
# One call on a GPU machine: the Triton kernel and model tests natively, then the offline benchmark.
# Runs from the source tree with the machine's own torch and Triton (nothing is installed).
# Usage: OUT=/some/dir bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH=src QUANTA_CPU_KERNELS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_triton_backend.py \
  > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -n 25 "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_offline.py --out "$OUT/gpu_offline.json" "$@" > "$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -n 40 "$OUT/bench.log"
