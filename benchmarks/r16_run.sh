#!/usr/bin/env bash
# Round 16's device call (docs/benchmarks.md "Round 16"): beam with the row_topk kernel, the gRPC
# KV path's malloc settings x chunk size (worker -> worker), the layer-wise first token over gRPC
# with the prefill's own completion time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TANDEM_SHARED=$PWD/.benchmodel/shared
STEPS="beam" bash benchmarks/round_run.sh
[ "${SLIM:-0}" = 1 ] || {
  python3 benchmarks/beam_profile.py --model Qwen2-0.5B --width 4 --sort host --top 30 > "$OUT/beamprof_host.log" 2>&1
  grep -A36 "W=4 beam" "$OUT/beamprof_host.log" | cut -c1-64,120-175 | head -40
}
timeout 120 python3 -m pytest -q -rA -o addopts="" -p no:cacheprovider -m gpu tests/worker \
  tests/kernels/test_triton_kernels.py -k "beam or row_topk" > "$OUT/beamtests.log" 2>&1
echo "beamtests rc $?"; grep -E "PASSED|FAILED|passed|failed" "$OUT/beamtests.log" | tail -8
if [ "${SLIM:-0}" = 1 ]; then  # the beam figures, the tests and the layer-wise row only
  timeout 120 python3 benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda --prompt-tokens 4096 \
    --repeats 3 --chunk-sizes 4194304 --transports grpc --fetch-streams 4 --out "$OUT/kv_ttft.json" > "$OUT/kv_ttft.log" 2>&1
  echo "ttft:"; grep -E "worker ->|token|loopback" "$OUT/kv_ttft.log"
  exit 0
fi
B=(python3 benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda --prompt-tokens 4096 --repeats 3
   --chunk-sizes 4194304 --transports grpc --fetch-streams 1,4)
for run in "1 4194304" "0 4194304"; do
  set -- $run
  TANDEM_KEEP_LARGE_BUFFERS=$1 timeout 100 "${B[@]}" --no-ttft --worker-args "--kv-chunk-bytes $2" \
    --out "$OUT/kv_keep$1_chunk$2.json" > "$OUT/kv_keep$1_chunk$2.log" 2>&1
  echo "keep $1 chunk $2:"; grep -E "worker ->|loopback" "$OUT/kv_keep$1_chunk$2.log"
done
timeout 120 "${B[@]}" --out "$OUT/kv_ttft.json" > "$OUT/kv_ttft.log" 2>&1
echo "ttft:"; grep -E "worker ->|token" "$OUT/kv_ttft.log"
