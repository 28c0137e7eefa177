#!/usr/bin/env bash
# The cost of the split under load, with where the time goes: serving_bench.py (scenario 4) on
# the Qwen2-0.5B shape against the in-process engine and through `tandem up`, the cores each
# service keeps busy per load point, py-spy samples of every process at concurrency >= 8, and
# the worker's GIL hand-off A/B (TANDEM_GIL_SWITCH_INTERVAL), the engine's hand-off of each step's
# outputs to the event loop (TANDEM_ENGINE_HANDOFF), GenerateMany's sink (TANDEM_GENERATE_SINK=0:
# the session's task woken each step) and the GenerateMany A/B
# (TANDEM_GENERATE_MUX=0: one Generate rpc per request), Admission's (TANDEM_ADMISSION_WAIT=$ADMIT_WAIT, 0.02 s:
# the engine waits for a burst's sessions before it steps; ADMIT_AB=0 skips it), then a traced run at concurrency 1 for
# the first token's timeline (serving_bench.py --trace). Output in $OUT (docs/benchmarks.md).
# SPY_NATIVE=1: the py-spy samples with native frames; SPY_GIL=1: only the thread holding each GIL;
# SPY_FROM=1: sample from concurrency 1 (default 8). GC_AB=0 skips the run with TANDEM_GC_FREEZE=0;
# PACK_AB=1 adds one with TANDEM_PACKED_TOKENS=0; ROUTING_AB=1 one with `tandem up --routing affinity`
# (the worker streams no KV events to the gateway).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then  # what the device image lacks, py-spy among them
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v WARNING
fi
TOK=${TOK:-.benchmodel/shared/tokenizers/qwen3}
CONC=${CONC:-1,8,32,64}
N=${N:-192}
common=(--shape "${SHAPE:-Qwen2-0.5B}" --tokenizer "$TOK" --device cuda --rates "" --concurrency "$CONC" --num-requests "$N" --repeats "${REPEATS:-1}" --out-dir "$OUT")
"$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified,inprocess --py-spy "$OUT/spy" --py-spy-from "${SPY_FROM:-8}" ${SPY_NATIVE:+--py-spy-native} ${SPY_GIL:+--py-spy-gil} --per-request --tag split_profile 2>&1 | tail -14
if [ "${GC_AB:-1}" = 1 ]; then  # the baseline of the frozen start-up heap: Python's collector as it is, both modes
  TANDEM_GC_FREEZE=0 "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified,inprocess --per-request \
    --tag split_gc_off 2>&1 | tail -6
fi
if [ "${PACK_AB:-0}" = 1 ]; then  # the baseline of packed tokens: every chunk a session response
  TANDEM_PACKED_TOKENS=0 "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified --tag split_pack_off 2>&1 | tail -6
fi
if [ "${ROUTING_AB:-0}" = 1 ]; then  # the gateway routing by affinity: no KV-event stream from the worker
  "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified --up-args "--routing affinity" \
    --per-request --tag split_affinity 2>&1 | tail -6
fi
if [ -n "${GIL_AB-0.0005}" ]; then  # (GIL_AB= skips it)
  TANDEM_GIL_SWITCH_INTERVAL=${GIL_AB-0.0005} "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified --tag split_gil_ab 2>&1 | tail -6
fi
if [ -n "${HANDOFF_AB-0.002}" ]; then  # the engine thread waits for the loop to take each step's outputs
  TANDEM_ENGINE_HANDOFF=${HANDOFF_AB-0.002} "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified \
    --tag split_handoff_ab 2>&1 | tail -6
fi
if [ "${ADMIT_AB:-1}" = 1 ]; then  # Admission on (off by default: the engine steps as soon as a burst's first request is in)
  TANDEM_ADMISSION_WAIT=${ADMIT_WAIT:-0.02} "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified --per-request --tag split_admit_on 2>&1 | tail -6
fi
if [ "${SINK_AB:-1}" = 1 ]; then  # the baseline of GenerateMany's sink: the session's task woken each step
  TANDEM_GENERATE_SINK=0 "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified --tag split_sink_off 2>&1 | tail -6
fi
if [ "${MUX_AB:-1}" = 1 ]; then  # the baseline of GenerateMany: one Generate rpc per request
  TANDEM_GENERATE_MUX=0 "$PY" benchmarks/serving_bench.py "${common[@]}" --modes unified --tag split_mux_off 2>&1 | tail -6
fi
if [ "${TRACE:-1}" = 1 ]; then  # where the first token's time goes at concurrency 1 (traced: one rpc a request)
  "$PY" benchmarks/serving_bench.py "${common[@]}" --concurrency 1 --num-requests 48 --modes unified --trace \
    --tag split_trace 2>&1 | tail -12
fi
"$PY" benchmarks/spy_top.py "$OUT/spy" --top 30 > "$OUT/spy_top.txt"
tar czf "$OUT/spy.tgz" -C "$OUT" spy && rm -rf "$OUT/spy"
