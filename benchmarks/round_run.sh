#!/usr/bin/env bash
# One device call of named steps (a round's checks and benchmarks), each with its own time budget;
# a failure of one does not stop the rest. Logs and JSON go to $OUT (default benchmarks/results).
#   STEPS="agree engine_moe beamprof" bash benchmarks/round_run.sh
# PACK=1 packs $OUT into round.tgz (and round.log) at the end: the device returns at most 8 files.
# Steps (moequant needs a call of its own: 74 tests, the quantized engines tuning their GEMMs): agree (bf16 agreement of the MoE / Gemma 3 / Qwen3 families; AGREE_FAMILIES="mixtral or gemma3" narrows it), moequant (fused MoE and
# fused quantized GEMM kernels in bf16), engine_moe / engine_gemma (batch-1 decode with a kernel
# profile), quant (quant_bench), beam (beam_bench Qwen2-0.5B with phases), beamprof (beam_profile),
# qgemv / qgemvtests (the word GEMV: quant_bench --gemv-only, bf16 tests), qgemvwide (--gemv-only --wide: a wider grid of word configs, fp8 and int4), attn / attntests (decode attention variants: bench, bf16 tests), lora (lora_bench), loratests (the LoRA kernels' and engine's bf16 tests), lorakern (lora_kernel_bench:
# the LoRA kernel configs alone), lorab64 (lora_bench's batch-64 rows with profiles and A/Bs), kvnixl (kv_transfer_bench with NIXL, CUDA IPC and gRPC; needs the nixl wheels),
# fp8dec (Llama-3.1-8B batch-1 decode, bf16 and fp8 weights, with kernel profiles), fp8fuse (fp8dec once a
# TANDEM_QUANT_FUSE mode, FP8FUSE_MODES="auto always" by default: the tuner's fused / unfused choice, then the one
# fused launch for every fused variant; "never" adds the unfused sequence; then each run's ms/token and the tuner's
# fused, gated-pair and unfused times at one row), beamhost (beam_profile's ops by host time), beamcprof (beam_bench at W = 4 with cProfile: the beam step's Python by function), beamtests (the beam and selection kernels' bf16 tests), beamab (beam_bench with the selection in one launch, then in three: TANDEM_BEAM_ONE_LAUNCH=1 / 0),
# kvttft (the gRPC fetch and its layer-wise first token, with the prefill's own completion),
# kvmalloc (worker -> worker over gRPC at 4 MiB chunks, TANDEM_KEEP_LARGE_BUFFERS=1 then =0),
# grpcopts (grpc_ceiling_bench: grpc core's channel defaults against large HTTP/2 frames and reads),
# split (split_profile_run.sh into $OUT/split, with its own variables: CONC, N, REPEATS, the _AB switches; SPLIT_T its budget),
# census (compile_census: Triton variants compiled per wave of new prompt lengths, batches and sampling options),
# decodeprof (step_profile: the kernels of decode steps of 256 sequences, fp8 weights with a bf16 / fp8 KV cache, fp16 / bf16 dots),
# kvcopyipc (kv_block_copy_bench --ipc-source: the copy from another process's cache over CUDA IPC, that process idle and busy), kvcopy (kv_block_copy_bench: a CUDA IPC fetch's device copy, torch's and the kernel's, and the kernel's GPU tests), kvipc (kv_transfer_bench over CUDA IPC alone: each fetch's stages, the copy's kernel time, both workers under py-spy),
# grpcrtt (grpc_rtt_bench: one small grpc.aio round trip between two processes, back to back and after idle pauses),
# kvhelpers (worker -> worker over gRPC at 4 MiB chunks: 1 and 4 streams with no wire helpers and with 3 a side, 4 and 8 streams with 7),
# kvcache (kv_cache_bench on Qwen2-0.5B multi-turn chat: 2 workers with --routing exact then affinity, one worker with a small
# device KV cache without and with --kv-offload-memory; hit rates and TTFT; a call of its own).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
for d in .whl .nixlwhl; do
  if ls $d/*.whl >/dev/null 2>&1; then "$PY" -m pip install -q --no-index --no-deps $d/*.whl 2>&1 | grep -v WARNING; fi
done
[ -d .benchmodel/shared ] && [ ! -d ../shared ] && export TANDEM_SHARED=${TANDEM_SHARED:-$PWD/.benchmodel/shared}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/round_gpu_info.txt"
step() {  # name, budget, command...
  local name=$1 budget=$2
  shift 2
  echo "=== $name (budget ${budget}s): $*" | tee -a "$OUT/round.log"
  local t0=$SECONDS
  timeout "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-30}" "$OUT/$name.log"
  echo "=== $name exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/round.log"
}
gpu_pytest=("$PY" -m pytest -q -rA -o addopts="" -p no:cacheprovider -m gpu -W ignore::DeprecationWarning)
for s in ${STEPS:?name the steps}; do
  case $s in
    agree) step agree "${AGREE_T:-170}" "${gpu_pytest[@]}" tests/kernels/test_engine_gpu.py -s \
      -k "test_logits_and_greedy_match_transformers and (${AGREE_FAMILIES:-qwen3_moe or mixtral or gemma3 or qwen3 or gpt_oss})" ;;
    moequant) step moequant "${MOEQUANT_T:-480}" "${gpu_pytest[@]}" tests/kernels/test_moe_router.py tests/kernels/test_fused_moe.py tests/kernels/test_quant_fused.py ;;
    quanttests) step quanttests "${QT_T:-150}" "${gpu_pytest[@]}" tests/kernels/test_quant_gemm.py tests/kernels/test_quant_fused.py ;;
    engine_moe) step engine_moe "${ENGINE_T:-170}" "$PY" benchmarks/engine_bench.py --models Qwen3-30B-A3B --skip-hf \
      --decode-only --profile-decode --out "$OUT/engine_moe.json" ;;
    fp8dec) step fp8dec "${FP8DEC_T:-150}" "$PY" benchmarks/engine_bench.py --models Llama-3.1-8B --skip-hf \
      --decode-only --profile-decode --quantization fp8 --out "$OUT/engine_fp8_decode.json" ;;
    fp8fuse)  # fp8dec under each TANDEM_QUANT_FUSE mode (one engine_bench process each), then a summary
      for mode in ${FP8FUSE_MODES:-auto always}; do
        TANDEM_QUANT_FUSE=$mode step "fp8fuse_$mode" "${FP8DEC_T:-150}" "$PY" benchmarks/engine_bench.py \
          --models Llama-3.1-8B --skip-hf --decode-only --profile-decode --quantization fp8 \
          --out "$OUT/engine_fp8fuse_$mode.json"
      done
      "$PY" - "$OUT" ${FP8FUSE_MODES:-auto always} <<'EOF' 2>&1 | tee -a "$OUT/round.log"
import json, sys

def us(value):
    return "-" if value is None else f"{value:.1f}"

for mode in sys.argv[2:]:
    try:
        with open(f"{sys.argv[1]}/engine_fp8fuse_{mode}.json") as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"fp8fuse {mode}: no report ({exc})")
        continue
    row = next((r for r in report["rows"] if r["scenario"] == "1 batch-1 decode fp8 weights"), None)
    if row is None:
        print(f"fp8fuse {mode}: no fp8 decode row")
        continue
    m = row["metrics"]
    graph = report["linear_tuning"].get("Llama-3.1-8B fp8 weights decode graph profile", [""])[0]
    print(f"fp8fuse {mode}: {m['ms_per_token']:.3f} ms/token, x_bf16 {m.get('x_bf16', 0):.3f}, "
          f"graph {m.get('graph_ms', 0):.3f} ms; {graph}")
    for d in row.get("fused_gemms", []):
        if d["rows"] == 1:
            print(f"  {d['label']}: fused {us(d['fused_us'])} us, pair {us(d['pair_us'])}, "
                  f"unfused {us(d['unfused_us'])} -> {d['verdict']}")
EOF
      ;;
    engine_gemma) step engine_gemma "${ENGINE_T:-120}" "$PY" benchmarks/engine_bench.py --models Gemma-3-12B --skip-hf \
      --decode-only --profile-decode --out "$OUT/engine_gemma.json" ;;
    quant) step quant "${QUANT_T:-150}" "$PY" benchmarks/quant_bench.py --out "$OUT/quant.json" ;;
    beam) step beam "${BEAM_T:-120}" "$PY" benchmarks/beam_bench.py --models Qwen2-0.5B --phases --out "$OUT/beam.json" ;;
    beamab)  # the one-launch selection (the default) against its three launches, same run
      for run in 1 2; do  # twice each, alternating (a drift of the host reaches both)
        for one in 1 0; do
          TANDEM_BEAM_ONE_LAUNCH=$one step "beam_one${one}_$run" "${BEAM_T:-120}" "$PY" benchmarks/beam_bench.py \
            --models Qwen2-0.5B --phases --runs 9 --repeat 3 --out "$OUT/beam_one${one}_$run.json"
        done
      done ;;
    beamcprof) step beamcprof "${BEAMCPROF_T:-90}" "$PY" benchmarks/beam_bench.py --models Qwen2-0.5B --widths 4 \
      --phases --profile --out "$OUT/beam_cprof.json" ;;
    decodeprof)  # decode steps of 256 sequences at contexts ~1,050 by kernel: fp8 weights with a bf16 KV
      # cache, then with an fp8 one (its dots in fp16, the default), then fp8 with bf16 dots (the A/B)
      step decodeprof_bf16kv "${DECODEPROF_T:-120}" "$PY" benchmarks/step_profile.py --decode-batch 256 \
        --decode-only --quantization fp8 --out "$OUT/step_profile_fp8w_bf16kv_256.json"
      step decodeprof_fp8kv "${DECODEPROF_T:-120}" "$PY" benchmarks/step_profile.py --decode-batch 256 \
        --decode-only --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/step_profile_fp8_256.json"
      TANDEM_FP8_KV_FP16_DOTS=0 step decodeprof_fp8kv_bf16dots "${DECODEPROF_T:-120}" "$PY" benchmarks/step_profile.py \
        --decode-batch 256 --decode-only --quantization fp8 --kv-cache-dtype fp8 \
        --out "$OUT/step_profile_fp8_256_bf16dots.json" ;;
    split) mkdir -p "$OUT/split"  # (split_profile_run.sh reads its own variables: CONC, N, the _AB switches)
      step split "${SPLIT_T:-300}" env OUT="$OUT/split" bash benchmarks/split_profile_run.sh ;;
    census) step census "${CENSUS_T:-150}" "$PY" benchmarks/compile_census.py --model Qwen2-0.5B \
      --out "$OUT/compile_census.json" ;;
    beamprof) step beamprof "${BEAMPROF_T:-70}" "$PY" benchmarks/beam_profile.py --model Qwen2-0.5B --width 4 ;;
    lora) step lora "${LORA_T:-200}" "$PY" benchmarks/lora_bench.py --out "$OUT/lora.json" ;;
    loratests) step loratests "${LORATESTS_T:-150}" "${gpu_pytest[@]}" tests/kernels/test_lora.py tests/lora/test_lora_gpu.py ;;
    lorakern) step lorakern "${LORAKERN_T:-150}" "$PY" benchmarks/lora_kernel_bench.py --out "$OUT/lora_kernels.json" ;;
    lorab64)  # the batch-64 rows with profiles, lorakern's fastest config at 64 rows (if it ran) and the side stream off
      fastest=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["fastest"]["64"])' "$OUT/lora_kernels.json" 2>/dev/null)
      step lorab64 "${LORAB64_T:-300}" "$PY" benchmarks/lora_bench.py --rows batch --profile --overlap-ab \
        --kernel-configs "${LORA_CONFIGS:-expand_columns=512 $fastest}" --out "$OUT/lora_b64.json" ;;
    kvnixl) step kvnixl "${KV_T:-200}" "$PY" benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda \
      --prompt-tokens 4096 --repeats 3 --chunk-sizes 4194304 --transports nixl,cuda-ipc,grpc --out "$OUT/kv_nixl.json" ;;
    kvcopyipc) step kvcopyipc "${KVCOPYIPC_T:-120}" "$PY" benchmarks/kv_block_copy_bench.py --ipc-source \
      --out "$OUT/kv_block_copy_ipc.json" ;;
    kvcopy)  # the CUDA IPC fetch's device copy alone (kv_block_copy_bench) and the kernel's bf16 / fp8 tests
      step kvcopytests "${KVCOPY_T:-150}" "${gpu_pytest[@]}" tests/kernels/test_kv_block_copy.py \
        tests/disagg/test_kv_first_token.py tests/disagg/test_kv_layerwise.py  # (the rest of tests/disagg needs openai)
      step kvcopy "${KVCOPY_T:-90}" "$PY" benchmarks/kv_block_copy_bench.py --out "$OUT/kv_block_copy.json" ;;
    kvipc) step kvipc "${KV_T:-200}" "$PY" benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda \
      --prompt-tokens 4096 --repeats 20 --chunk-sizes 4194304 --transports cuda-ipc --py-spy "$OUT/kvspy" \
      --out "$OUT/kv_ipc.json" ;;
    grpcrtt) step grpcrtt "${GRPCRTT_T:-60}" "$PY" benchmarks/grpc_rtt_bench.py --out "$OUT/grpc_rtt.json" ;;
    attn) step attn "${ATTN_T:-150}" "$PY" benchmarks/decode_attention_bench.py --out "$OUT/decode_attention_small.json" ;;
    attntests) step attntests "${ATTNTESTS_T:-120}" "${gpu_pytest[@]}" tests/kernels/test_decode_attention_variants.py ;;
    qgemv) step qgemv "${QGEMV_T:-150}" "$PY" benchmarks/quant_bench.py --gemv-only --out "$OUT/quant_gemv.json" ;;
    qgemvwide) step qgemvwide "${QGEMVWIDE_T:-240}" "$PY" benchmarks/quant_bench.py --gemv-only --wide --formats fp8,int4 \
      --out "$OUT/quant_gemv_wide.json" ;;
    beamhost) step beamhost "${BEAMHOST_T:-70}" "$PY" benchmarks/beam_profile.py --model Qwen2-0.5B --width 4 \
      --sort host --top 30 ;;
    beamtests) step beamtests "${BEAMTESTS_T:-120}" "${gpu_pytest[@]}" tests/worker \
      tests/kernels/test_triton_kernels.py tests/kernels/test_beam_kernel_variants.py -k "beam or row_topk or staged" ;;
    kvttft) step kvttft "${KV_T:-120}" "$PY" benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B --device cuda \
      --prompt-tokens 4096 --repeats 3 --chunk-sizes 4194304 --transports grpc --fetch-streams 4 --out "$OUT/kv_ttft.json" ;;
    kvmalloc)
      for keep in 1 0; do
        TANDEM_KEEP_LARGE_BUFFERS=$keep step "kvmalloc$keep" "${KV_T:-100}" "$PY" benchmarks/kv_transfer_bench.py \
          --shape Llama-3.1-8B --device cuda --prompt-tokens 4096 --repeats 3 --chunk-sizes 4194304 --transports grpc \
          --fetch-streams 1,4 --no-ttft --worker-args "--kv-chunk-bytes 4194304" --out "$OUT/kv_keep$keep.json"
      done ;;
    kvhelpers)  # helpers a side: streams (KVH_POINTS narrows them)
      for point in ${KVH_POINTS:-0:1,4 3:1,4 7:4,8}; do  # helpers:streams
        helpers=${point%%:*}
        step "kvhelpers$helpers" "${KV_T:-100}" "$PY" benchmarks/kv_transfer_bench.py --shape Llama-3.1-8B \
          --device cuda --prompt-tokens 4096 --repeats 3 --chunk-sizes 4194304 --transports grpc \
          --fetch-streams "${point#*:}" --no-ttft --worker-args "--kv-chunk-bytes 4194304 --kv-wire-helpers $helpers" \
          --out "$OUT/kv_helpers$helpers.json"
      done ;;
    grpcopts) step grpcopts "${GRPCOPTS_T:-200}" "$PY" benchmarks/grpc_ceiling_bench.py --servers 1,4 \
      --connections 1,4 --malloc default,buffers+arena1 --channel-options default,large-frames --out "$OUT/grpc_options.json" ;;
    kvcache) step kvcache "${KVCACHE_T:-540}" "$PY" benchmarks/kv_cache_bench.py --shape Qwen2-0.5B --device cuda \
      --tokenizer "${TANDEM_SHARED:-../shared}/tokenizers/${KVCACHE_TOK:-qwen3}" --out-dir "$OUT" ;;
    qgemvtests) step qgemvtests "${QGEMVTESTS_T:-240}" "${gpu_pytest[@]}" tests/kernels/test_quant_gemv.py ;;
    *) echo "unknown step $s" ;;
  esac
done
if [ "${PACK:-0}" = 1 ]; then  # the device returns at most 8 files: everything but round.log in one archive
  (cd "$OUT" && find . -type f ! -name round.log ! -name round.tgz -print0 | tar czf round.tgz --null -T - \
    && find . -type f ! -name round.log ! -name round.tgz -delete && find . -mindepth 1 -type d -empty -delete)
fi
