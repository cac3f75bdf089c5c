#!/usr/bin/env bash
# One call on a GPU machine: the Triton kernel and model tests natively, then the offline benchmark, and
# (RUN includes "fidelity") the simulator's fidelity protocol on the Llama-3.1-8B shape (issue 14).
# Runs from the source tree with the machine's own torch and Triton (nothing is installed).
# Usage: OUT=/some/dir [RUN="tests bench fidelity"] bash benchmarks/gpu_checks.sh [gpu_offline.py args]
# (default RUN="tests bench"; the three together take longer than one 10-minute call: split them)
set -u
OUT=${OUT:-results}
RUN=${RUN:-tests bench}
mkdir -p "$OUT"
export PYTHONPATH=src QUANTA_CPU_KERNELS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [[ " $RUN " == *" tests "* ]]; then
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_triton_backend.py \
    > "$OUT/tests.log" 2>&1
  echo "tests exit $?"; tail -n 25 "$OUT/tests.log"
fi
if [[ " $RUN " == *" bench "* ]]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/gpu_offline.py --out "$OUT/gpu_offline.json" "$@" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; tail -n 40 "$OUT/bench.log"
fi
if [[ " $RUN " == *" fidelity "* ]]; then
  # Unscaled ShareGPT lengths (clipped to the profile's 2,048-token context) at 8 req/s, wall clock.
  timeout "${FIDELITY_TIMEOUT:-420}" python3 benchmarks/sim_fidelity.py --device cuda --shape llama-3.1-8b \
    --clock wall --length-scale 1 --qps "${FIDELITY_QPS:-8}" --num-requests "${FIDELITY_REQUESTS:-400}" \
    --out "$OUT/sim_fidelity.json" > "$OUT/fidelity.log" 2>&1
  echo "fidelity exit $?"; tail -n 30 "$OUT/fidelity.log"
fi
