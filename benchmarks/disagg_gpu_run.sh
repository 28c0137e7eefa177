#!/usr/bin/env bash
# One device call for disaggregation (scenario 6): FetchKV GB/s (loopback and worker to worker) and
# scenario 4 through the gateway, unified vs disaggregated (both workers on one GPU). Needs the
# generated tandem/v1 and the wheels in .whl (opentelemetry, grpcio-health-checking/-reflection)
# and a Qwen2 tokenizer in .benchmodel/qwen2.5 carried along. Results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/disagg_gpu_info.txt"
timeout "${KV_TIMEOUT:-170}" python3 benchmarks/kv_transfer_bench.py --shape Qwen2-0.5B --device cuda \
  --decode-device "${DECODE_DEVICE:-cuda}" \
  --prompt-tokens 4096 --repeats 5 --out "$OUT/kv_transfer_Qwen2-0.5B_cuda${TAG_SUFFIX:-}.json" 2>&1 | tee "$OUT/kv_transfer_cuda${TAG_SUFFIX:-}.log"
# Issue 20's case: a Llama-3.1-8B-shaped 4,096-token prompt (512 MiB of KV), each transport
# (gRPC, CUDA IPC) and the device copy bandwidth beside it; KV_8B=0 skips it.
if [ "${KV_8B:-1}" = 1 ]; then
  timeout "${KV_8B_TIMEOUT:-300}" python3 benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda \
    --prompt-tokens 4096 --repeats 5 --chunk-sizes 1048576,4194304 --transports grpc,cuda-ipc \
    --out "$OUT/kv_transfer_Llama-3.1-8B_cuda${TAG_SUFFIX:-}.json" 2>&1 | tee "$OUT/kv_transfer_8b_cuda${TAG_SUFFIX:-}.log"
fi
timeout "${SERVING_TIMEOUT:-400}" python3 benchmarks/serving_bench.py --shape Qwen2-0.5B --tokenizer .benchmodel/qwen2.5 \
  --device cuda --input-len 1024 --output-len 128 --rates 4,16,32 --concurrency 1,16,64 --num-requests 48 \
  --worker-args "--max-num-seqs 64" --unified-workers "${UNIFIED_WORKERS:-1}" \
  --tag "Qwen2-0.5B_cuda${TAG_SUFFIX:-}" --out-dir "$OUT" 2>&1 | tee "$OUT/serving_cuda${TAG_SUFFIX:-}.log"
echo "done"
