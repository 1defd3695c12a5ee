#!/usr/bin/env bash
# Hybrid decoding on the lent GPU machine (see scripts/gpu-env.sh for what it needs): the GPU
# tests, then `bench` decode of the synthesized 7B at each resident-layer count and --cpu-layers
# split given, a line per run (ms/token, the CPU's share, prediction where the build makes one),
# all in one call so the splits are compared on one host.
#
# Usage: scripts/gpu-hybrid.sh
# Env: SPLITS (default "8:0 8:8 8:10 8:12 8:14 0:0 0:14 0:16 0:18"; N:C = N resident layers, C on
#      the CPU), BATCH2_SPLITS (default "8:0 8:12"; the CFG pair), GEN (tokens, default 16),
#      AUTO=1 (also `bench --cpu-layers auto` at N = 8 and 0, batch 1 and 2, and a 32-frame
#      `generate --num-gpu-layers 8 --cpu-layers auto` of the demo script in dist/voice),
#      CALIBRATE=1 (first `bench --calibrate`; the benches and `generate` after it predict and
#      split from that calibration, so their predictions are checks it was not fitted on),
#      RUNS (decodes per bench, default 5: the median, as the calibration takes, so that its
#      predictions are checked against the same statistic), SKIP_TESTS=1. The JSON go to
#      $OUT/hybrid.tgz.
source "$(dirname "$0")/gpu-env.sh"
lscpu | grep -E "^Model name|^CPU\(s\)|^Thread|^NUMA node\(s\)" || :
if [[ -z ${SKIP_TESTS:-} ]]; then run_gpu_tests; fi
mkdir -p /tmp/hy
cal=()
if [[ -n ${CALIBRATE:-} ]]; then
  echo "== bench --calibrate"
  "$bin" bench --calibrate --device cuda --model-path "$model" --gen-tokens "${GEN:-16}" \
    --calibration /tmp/hy/calibration.json > /tmp/hy.log 2>&1 ||
    { tail -5 /tmp/hy.log; fail "bench --calibrate"; }
  cat /tmp/hy.log
  cal=(--calibration /tmp/hy/calibration.json)
  "$bin" table --lm-only --layers 28,20,12,8,4,0 --cpu-layers auto "${cal[@]}" 2>&1 | grep -E "^│|^CPU|^  " ||
    fail "table --cpu-layers auto from the calibration"
fi
measure() {
  local batch=$1 spec=$2 n c json
  n=${spec%%:*}
  c=${spec##*:}
  json=/tmp/hy/b$batch-n$n-c$c.json
  "$bin" bench --device cuda --model-path "$model" --layers "$n" --cpu-layers "$c" --batch "$batch" \
    --runs "${RUNS:-5}" --gen-tokens "${GEN:-16}" --json-out "$json" "${cal[@]}" > /tmp/hy.log 2>&1 ||
    { tail -3 /tmp/hy.log; fail "bench N=$n C=$c batch $batch"; return; }
  python3 - "$json" "$n" "$c" "$batch" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
row = r['rows'][0]
pred = row.get('predicted_ms_per_token')
print(f"batch {sys.argv[4]}  N={sys.argv[2]:>2} C={sys.argv[3]:>2}: decode {row['decode_ms_per_token']:7.2f} ms/token"
      f" (runs {', '.join(f'{x:.2f}' for x in row['decode_runs_ms_per_token'])}),"
      f" copies {row['streamed_bytes_per_token'] / 1e9:.2f} GB/token at {row['achieved_gbps']:.1f} GB/s,"
      f" ttft {row['ttft_ms']:.0f} ms, test-speed {row['test_speed_ms']:.0f} ms"
      + (f", CPU {row['cpu_compute_ms_per_token']:.2f} ms/token" if row.get('cpu_compute_ms_per_token') else "")
      + (f" (hand-offs {row['cpu_handoff_ms_per_token']:.2f}, products {row['cpu_products_ms_per_token']:.2f})"
         if row.get('cpu_products_ms_per_token') is not None else "")
      + (f", predicted {pred:.2f} ({100 * (pred / row['decode_ms_per_token'] - 1):+.1f}%)" if pred else ""))
PY
}
for spec in ${SPLITS:-8:0 8:8 8:10 8:12 8:14 0:0 0:14 0:16 0:18}; do measure 1 "$spec"; done
# Where a host layer's time goes (`run --json` keeps the whole transfer record).
for spec in ${RUN_SPLITS:-}; do
  n=${spec%%:*}
  c=${spec##*:}
  "$bin" run --device cuda --model-path "$model" --num-gpu-layers "$n" --cpu-layers "$c" \
    --gen-tokens "${GEN:-16}" --json > "/tmp/hy/run-n$n-c$c.json" 2> /tmp/hy.log ||
    { tail -3 /tmp/hy.log; fail "run N=$n C=$c"; continue; }
  python3 - "/tmp/hy/run-n$n-c$c.json" "$n" "$c" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))['decode']
t, steps = d['transfer'], d['generated_tokens'] - 1
print(f"run N={sys.argv[2]} C={sys.argv[3]}: {d['ms_per_token']:.2f} ms/token; per step in host layers "
      f"{t['cpu_compute_ms'] / steps:.2f} ms, of it hand-overs (with the wait for the GPU) "
      f"{t['cpu_handoff_ms'] / steps:.2f} ms; copy wait {t['compute_wait_ms'] / steps:.2f} ms")
PY
done
for spec in ${BATCH2_SPLITS:-8:0 8:12}; do measure 2 "$spec"; done
if [[ -n ${AUTO:-} ]]; then
  for batch in 1 2; do
    echo "== bench --cpu-layers auto, batch $batch"
    "$bin" bench --device cuda --model-path "$model" --layers 8,0 --cpu-layers auto --batch "$batch" \
      --runs "${RUNS:-5}" --gen-tokens "${GEN:-16}" --json-out "/tmp/hy/auto-b$batch.json" "${cal[@]}" \
      > /tmp/hy.log 2>&1 ||
      { tail -3 /tmp/hy.log; fail "bench --cpu-layers auto, batch $batch"; }
    sed -n '/^hybrid decoding/,$p' /tmp/hy.log
  done
  echo "== generate, 8 GPU layers, --cpu-layers auto"
  voice=dist/voice
  "$bin" generate --device cuda --model-path "$model" --num-gpu-layers 8 --cpu-layers auto \
    --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
    --force-frames 32 --steps 10 --out /tmp/hy.wav --force --json-out /tmp/hy/generate.json \
    "${cal[@]}" > /tmp/gen.log 2>&1 ||
    { tail -5 /tmp/gen.log; fail "generate --cpu-layers auto"; }
  grep -E "cpu-layers auto|RTF|real-time" /tmp/gen.log | head -5 || :
fi
tar czf "$out/hybrid.tgz" -C /tmp hy
finish
