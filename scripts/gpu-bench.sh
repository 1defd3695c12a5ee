#!/usr/bin/env bash
# The benchmark run, for the lent GPU machine (see scripts/gpu-env.sh for what it needs): GPU
# tests, streamed-vs-resident identity on 7B, `bench` over the default layer counts (its tables,
# JSON and plot), and the PyTorch baselines on the same checkpoint, all in one process tree so
# the ratios are measured side by side. With BASELINE=path/to/bench.json, a bench slower than it
# (beyond 10% and the run-to-run spread: `bench --baseline` exits 3) makes the script exit 3 once
# everything else has run (the CI benchmark: `BASELINE=... scripts/gpu-bench.sh`); SKIP_PYTORCH=1
# leaves the PyTorch baselines out; BATCH=4 adds a bench of 4 sequences decoded together
# (BATCH_LAYERS, default 28,8,0). Exit status: 0 all passed; 1 any test, run, dump comparison or
# bench failed (whatever the baseline said); 3 only slower than the baseline.
# Results in $OUT: bench.json, bench.svg, bench-batch.json, pytorch.json, log.txt.
source "$(dirname "$0")/gpu-env.sh"

echo "== GPU tests"
run_gpu_tests

echo "== streamed vs resident, 7B"
check_dumps "--num-gpu-layers 8" "--num-gpu-layers 12 --placement spread --slots 3"

echo "== bench"
bench_flags=(--device cuda --model-path "$model" --json-out "$out/bench.json" --plot "$out/bench.svg" ${LAYERS:+--layers "$LAYERS"})
[[ -n ${BASELINE:-} ]] && bench_flags+=(--baseline "$BASELINE")
status=0
"$bin" bench "${bench_flags[@]}" || status=$?
case $status in
  0) ;;
  3) regression "bench: slower than ${BASELINE:-the baseline}" ;;
  *) fail "bench (exit $status)" ;;
esac

if [[ -n ${BATCH:-} ]]; then
  echo "== bench, batch $BATCH (copies shared by the batch)"
  "$bin" bench --device cuda --model-path "$model" --batch "$BATCH" --layers "${BATCH_LAYERS:-28,8,0}" \
    --json-out "$out/bench-batch.json" || fail "bench, batch $BATCH"
fi

if [[ -f scripts/pytorch_baseline.py && -z ${SKIP_PYTORCH:-} ]]; then
  echo "== PyTorch baselines (same checkpoint, same prompt and generation lengths)"
  python3 scripts/pytorch_baseline.py "$model/vibevoice7b_float8_e4m3fn.safetensors" \
    --layers "${PT_LAYERS:-28,20,12,8,4}" --prompt-len 128 --gen-tokens 32 --device cuda --json "$out/pytorch.json" || fail "pytorch baseline"
fi

finish
