#!/usr/bin/env bash
# Device A/B of decode-step options (docs/gpu.md): optional GPU tests, then the batch-1 decode
# scenario of engine_bench once per variant. A variant is NAME or NAME:VAR=V,VAR=V (environment for
# that run), e.g. VARIANTS="off:TANDEM_PDL=0 on" (the default). Every variant's output is appended
# to one log, $OUT/decode_ab.log (the device returns at most 8 files), and its table row is echoed.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/info.txt" 2>&1
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest ${TESTS:-tests/kernels tests/worker/test_worker_gpu.py} -m gpu \
    -o addopts="" -p no:cacheprovider -q -x -W ignore::DeprecationWarning > "$OUT/gpu_tests.log" 2>&1
  tail -3 "$OUT/gpu_tests.log"
fi
for variant in ${VARIANTS:-off:TANDEM_PDL=0 on}; do
  name=${variant%%:*}
  envs=""
  [ "$name" != "$variant" ] && envs=$(echo "${variant#*:}" | tr ',' ' ')
  log=$(mktemp)
  env $envs OUT= timeout "${VARIANT_TIMEOUT:-200}" "$PY" benchmarks/engine_bench.py --models "${MODELS:-Llama-3.1-8B}" \
    --decode-only --skip-hf ${BENCH_ARGS:-} --out "/tmp/decode_$name.json" > "$log" 2>&1
  status=$?
  { echo "===== variant $name ($envs) models ${MODELS:-Llama-3.1-8B}: exit $status"; cat "$log"; } >> "$OUT/decode_ab.log"
  echo "== $name ($envs): exit $status"
  grep -E "^[A-Za-z0-9.-]+ +1 batch-1 decode  " "$log"
  rm -f "$log"
done
