#!/usr/bin/env bash
# One device call for the feature benchmarks that have never met a GPU in the same run: LoRA (#23),
# multimodal (#25), quantized weights (#19), speculative decoding and beam search (#21), the
# Llama-3.1-8B KV transfer (#20). Each script has its own time budget (seconds, env overrides) and a
# failure of one does not stop the others. Logs and JSON go to $OUT (docs/benchmarks.md).
# BENCHES picks a subset, e.g. BENCHES="lora quant".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if ! "$PY" -c "import llguidance, grpc_health, opentelemetry.sdk" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v WARNING
fi
[ -d .benchmodel/shared ] && [ ! -d ../shared ] && export TANDEM_SHARED=${TANDEM_SHARED:-$PWD/.benchmodel/shared}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/feature_gpu_info.txt"
run() {  # name, budget, command...
  local name=$1 budget=$2
  shift 2
  echo "=== $name (budget ${budget}s): $*" | tee -a "$OUT/feature_bench.log"
  local t0=$SECONDS
  timeout "$budget" "$@" 2>&1 | tee "$OUT/${name}_bench.log" | tail -25
  echo "=== $name exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$OUT/feature_bench.log"
}
for b in ${BENCHES:-lora quant mm spec beam kv8b}; do
  case $b in
    lora) run lora "${LORA_T:-240}" "$PY" benchmarks/lora_bench.py --out "$OUT/lora.json" ;;
    quant) run quant "${QUANT_T:-150}" "$PY" benchmarks/quant_bench.py --out "$OUT/quant.json" ;;
    mm) run mm "${MM_T:-120}" "$PY" benchmarks/mm_bench.py --out "$OUT/mm.json" ;;
    spec) run spec "${SPEC_T:-150}" "$PY" benchmarks/spec_bench.py --ks "${SPEC_KS:-2,4}" --out "$OUT/spec.json" ;;
    beam) run beam "${BEAM_T:-120}" "$PY" benchmarks/beam_bench.py --models "${BEAM_MODELS:-Llama-3.1-8B}" --out "$OUT/beam.json" ;;
    fp8engine) run fp8engine "${FP8E_T:-560}" "$PY" benchmarks/engine_bench.py --models Llama-3.1-8B --skip-hf \
      --skip-variants --quantization fp8 --out "$OUT/engine_fp8.json" ;;  # a call of its own (BENCHES=fp8engine)
    mmserve) run mmserve "${MMSERVE_T:-540}" "$PY" benchmarks/mm_serving_bench.py --device cuda ;;  # a call of its own
    kv8b) run kv8b "${KV_T:-120}" "$PY" benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda \
      --prompt-tokens 4096 --repeats 3 --chunk-sizes 4194304 --transports grpc,cuda-ipc --out "$OUT/kv_transfer_8b.json" ;;
    *) echo "unknown bench $b" ;;
  esac
done
