#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU (the lent H100/H200): run it from the repo root
# with the CUDA build carried in dist/ (scripts/build-cuda.sh --tests --pack puts gzipped copies
# in dist/pack, small enough to carry). In one go it
#   1. runs the GPU test binaries (CUDA kernel vs CPU decoder, streamed vs resident bit for bit),
#   2. synthesizes a 7B float8 checkpoint (never carried: 9.3 GB),
#   3. runs `run --test-speed` and decode for N = 28 20 12 8 4,
#   4. checks that streamed and resident 7B runs dump byte-identical hidden states and logits,
#   5. prints a short table.
# Results go to $OUT (the device tool's folder) or ./gpu-results: results.jsonl and log.txt.
source "$(dirname "$0")/gpu-env.sh"

failed=0
fail() { echo "FAIL: $*"; failed=1; }

echo "== 1. GPU tests"
for t in "$tests_dir"/*; do
  [[ -x $t ]] || continue
  echo "-- $(basename "$t")"
  "$t" --test-threads=1 > /tmp/test.log 2>&1 || fail "$(basename "$t")"
  grep -E "^test |test result|panicked|worst" /tmp/test.log || :
done

echo "== 2. 7B float8 checkpoint"
"$bin" inspect --model-path "$model" | head -3

echo "== 3. run for N = ${LAYER_COUNTS:=28 20 12 8 4}"
for n in $LAYER_COUNTS; do
  for mode in test-speed decode; do
    flags=(--device cuda --model-path "$model" --num-gpu-layers "$n" --json)
    [[ $mode == test-speed ]] && flags+=(--test-speed) || flags+=(--gen-tokens "${GEN_TOKENS:-32}")
    if "$bin" run "${flags[@]}" > /tmp/run.json 2> /tmp/run.err; then
      python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["mode"]=sys.argv[2]; print(json.dumps(d))' /tmp/run.json "$mode" >> "$results"
    else
      fail "run N=$n $mode: $(cat /tmp/run.err)"
    fi
  done
done

echo "== 4. streamed vs resident, 7B"
ids=151,9707,11,1879,0,752,374,279,4128,315
"$bin" run --device cuda --model-path "$model" --no-offload --input-ids "$ids" --dump /tmp/dump-resident.safetensors > /dev/null || fail "resident run"
for variant in "--num-gpu-layers 8" "--num-gpu-layers 0" "--num-gpu-layers 12 --placement spread --slots 3" "--num-gpu-layers 4 --no-pin --no-prefetch"; do
  # shellcheck disable=SC2086
  "$bin" run --device cuda --model-path "$model" $variant --input-ids "$ids" --dump /tmp/dump-streamed.safetensors > /dev/null || fail "run $variant"
  if cmp -s /tmp/dump-resident.safetensors /tmp/dump-streamed.safetensors; then
    echo "identical: $variant"
  else
    fail "DIFFERENT: $variant"
  fi
done

echo "== 5. summary"
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'N':>3} {'mode':<10} {'ms':>9} {'ms/token':>9} {'GB/s':>7} {'overlap%':>8} {'est GiB':>8} {'peak GiB':>8} {'load s':>7}")
for r in rows:
    n = r["engine"]["gpu_layers"]
    t = r.get("test_speed") or {}
    d = r.get("decode") or {}
    tr = (t or d).get("transfer", {})
    peak = r["vram"].get("measured_peak_bytes")
    print(f"{n:>3} {r['mode']:<10} {t.get('avg_ms', float('nan')):>9.2f} {d.get('ms_per_token', float('nan')):>9.2f} "
          f"{tr.get('achieved_gbps', 0):>7.2f} {tr.get('overlap_pct', 0):>8.1f} {r['estimate']['total_bytes']/2**30:>8.2f} "
          f"{(peak or 0)/2**30:>8.2f} {r['load_ms']/1000:>7.1f}")
PY

if (( failed )); then
  echo "== FAILED"
  exit 1
fi
