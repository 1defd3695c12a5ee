#!/usr/bin/env bash
# The benchmark run, for the lent GPU machine (see scripts/gpu-env.sh for what it needs): GPU
# tests, streamed-vs-resident identity on 7B, `bench` over the default layer counts (table,
# JSON, plot), and the PyTorch baselines on the same checkpoint, all in one process tree so the
# ratios are measured side by side. With BASELINE=path/to/bench.json it also fails on a
# regression beyond 10% (the CI benchmark: `BASELINE=... scripts/gpu-bench.sh`); SKIP_PYTORCH=1
# leaves the PyTorch baselines out; BATCH=4 adds a bench of 4 sequences decoded together
# (BATCH_LAYERS, default 28,8,0).
# Results in $OUT: bench.json, bench.svg, bench-batch.json, pytorch.json, log.txt.
source "$(dirname "$0")/gpu-env.sh"

failed=0
fail() { echo "FAIL: $*"; failed=1; }

echo "== GPU tests"
for t in "$tests_dir"/*; do
  [[ -x $t ]] || continue
  "$t" --test-threads=1 > /tmp/test.log 2>&1 || fail "$(basename "$t")"
  grep -E "^test |test result|panicked|worst" /tmp/test.log || :
done

echo "== streamed vs resident, 7B"
ids=151,9707,11,1879,0,752,374,279,4128,315
"$bin" run --device cuda --model-path "$model" --no-offload --input-ids "$ids" --dump /tmp/dump-resident.safetensors > /dev/null || fail "resident run"
for variant in "--num-gpu-layers 8" "--num-gpu-layers 12 --placement spread --slots 3"; do
  # shellcheck disable=SC2086
  "$bin" run --device cuda --model-path "$model" $variant --input-ids "$ids" --dump /tmp/dump-streamed.safetensors > /dev/null || fail "run $variant"
  cmp -s /tmp/dump-resident.safetensors /tmp/dump-streamed.safetensors && echo "identical: $variant" || fail "DIFFERENT: $variant"
done

echo "== bench"
bench_flags=(--device cuda --model-path "$model" --json --plot "$out/bench.svg" ${LAYERS:+--layers "$LAYERS"})
[[ -n ${BASELINE:-} ]] && bench_flags+=(--baseline "$BASELINE")
"$bin" bench "${bench_flags[@]}" > "$out/bench.json" || fail "bench"
python3 - "$out/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"pinned {r['pinned_gbps']:.1f} GB/s on {r['device']}")
print(f"device memory {r['device_gbps']:.0f} GB/s")
print(f"{'N':>3} {'prefill ms':>10} {'GPU ms':>7} {'host ms':>7} {'ms/token':>9} {'GPU ms':>7} {'host ms':>7} {'bound':>7} {'x bound':>7} {'GB/s':>6} {'overlap':>7} {'est GiB':>8} {'meas GiB':>8} {'err %':>6} {'load s':>6}")
for x in r["rows"]:
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
    print(f"{x['gpu_layers']:>3} {x['test_speed_ms']:>10.2f} {f(x.get('test_speed_gpu_ms')):>7} {f(x.get('test_speed_host_ms')):>7} "
          f"{x['decode_ms_per_token']:>9.2f} "
          f"{f(x['decode_gpu_ms_per_token']):>7} {f(x['decode_host_ms_per_token']):>7} {f(x['bound_ms_per_token']):>7} "
          f"{f(x['vs_bound']):>7} {x['achieved_gbps']:>6.1f} {x['overlap_pct']:>7.1f} {x['estimate_bytes']/2**30:>8.2f} "
          f"{f(x['measured_peak_bytes'] and x['measured_peak_bytes']/2**30):>8} {f(x['estimate_error_pct'], 1):>6} {x['load_ms']/1e3:>6.1f}")
PY

if [[ -n ${BATCH:-} ]]; then
  echo "== bench, batch $BATCH (copies shared by the batch)"
  "$bin" bench --device cuda --model-path "$model" --batch "$BATCH" --layers "${BATCH_LAYERS:-28,8,0}" --json > "$out/bench-batch.json"
  python3 - "$out/bench-batch.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for x in r["rows"]:
    print(f"N={x['gpu_layers']:>2} batch {r['batch']}: {x['decode_ms_per_token']:.2f} ms/step, "
          f"{x['tokens_per_s']:.1f} tokens/s, estimate {x['estimate_bytes']/2**30:.2f} GiB, "
          f"measured {x['measured_peak_bytes']/2**30:.2f} GiB")
PY
fi

if [[ -f scripts/pytorch_baseline.py && -z ${SKIP_PYTORCH:-} ]]; then
  echo "== PyTorch baselines (same checkpoint, same prompt and generation lengths)"
  python3 scripts/pytorch_baseline.py "$model/vibevoice7b_float8_e4m3fn.safetensors" \
    --layers "${PT_LAYERS:-28,20,12,8,4}" --prompt-len 128 --gen-tokens 32 --device cuda --json "$out/pytorch.json" || fail "pytorch baseline"
fi

if (( failed )); then
  echo "== FAILED"
  exit 1
fi
