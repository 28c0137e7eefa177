#!/usr/bin/env bash
# The one command for a GPU machine: GPU tests (kernels in bf16, engine vs transformers, CUDA graphs
# on/off), then the engine benchmark (ceilings, scenarios 1, 2, 3, 5, HF baseline). Logs and the
# benchmark JSON go to $OUT (default benchmarks/results). See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu_info.txt"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu_info.txt"
# The worker's tests import what the device image lacks (llguidance, grpcio-health-checking,
# opentelemetry): install the wheels carried in .whl/ (docs/gpu.md).
if ! "$PY" -c "import llguidance, grpc_health, opentelemetry.sdk" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v WARNING
fi
# The device copy has no ../shared: tests read the stories260K / tokenizer copies carried in
# .benchmodel/shared when that exists (docs/gpu.md).
[ -d .benchmodel/shared ] && [ ! -d ../shared ] && export TANDEM_SHARED=${TANDEM_SHARED:-$PWD/.benchmodel/shared}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-560}" "$PY" -m pytest tests/kernels tests/worker tests/lora tests/disagg/test_kv_layerwise.py \
    -m gpu -o addopts="" -p no:cacheprovider -q -s --durations=25 \
    -W ignore::DeprecationWarning 2>&1 | tee "$OUT/gpu_tests.log"
  echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-380}" "$PY" benchmarks/engine_bench.py ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  echo "bench exit: ${PIPESTATUS[0]}"
fi
