#!/usr/bin/env bash
# device: GPU kernel + engine tests, then batch-1 decode with PDL on / off / no-prefetch
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/info.txt 2>&1
timeout 240 $PY -m pytest tests/kernels tests/worker/test_worker_gpu.py -m gpu -o addopts="" -p no:cacheprovider -q -x -W ignore::DeprecationWarning > $OUT/gpu_tests.log 2>&1
echo "gpu tests exit $?" >> $OUT/gpu_tests.log; tail -5 $OUT/gpu_tests.log
for v in on nopf off; do
  case $v in on) E="";; nopf) E="TANDEM_PDL_PREFETCH=0";; off) E="TANDEM_PDL=0";; esac
  env $E timeout 200 $PY benchmarks/engine_bench.py --models ${MODELS:-Llama-3.1-8B,Qwen2-0.5B} --decode-only --skip-hf ${PROF:---profile-decode} --out $OUT/decode_$v.json > $OUT/decode_$v.log 2>&1
  echo "$v exit $?"; grep -E "batch-1 decode  |graph:|_kernel|nvjet" $OUT/decode_$v.log | head -30
done
