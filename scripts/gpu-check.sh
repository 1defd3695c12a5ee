#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU (the lent H100/H200): run it from the repo root
# with the CUDA build carried in dist/ (scripts/build-cuda.sh --tests --pack puts gzipped copies
# in dist/pack, small enough to carry). In one go it
#   1. runs the GPU test binaries (CUDA kernel vs CPU decoder, streamed vs resident bit for bit),
#   2. synthesizes a 7B float8 checkpoint (never carried: 9.3 GB),
#   3. runs `run --test-speed` and decode for N = 28 20 12 8 4, printing each run's report,
#   4. checks that streamed and resident 7B runs dump byte-identical hidden states and logits.
# Exits 1 when any test, run or dump comparison fails. Results go to $OUT (the device tool's
# folder) or ./gpu-results: run-N-MODE.json (each run's `--json` report) and log.txt.
source "$(dirname "$0")/gpu-env.sh"

echo "== 1. GPU tests"
run_gpu_tests

echo "== 2. 7B float8 checkpoint"
"$bin" inspect --model-path "$model" | head -3

echo "== 3. run for N = ${LAYER_COUNTS:=28 20 12 8 4}"
for n in $LAYER_COUNTS; do
  for mode in test-speed decode; do
    echo "-- N=$n $mode"
    flags=(--device cuda --model-path "$model" --num-gpu-layers "$n" --json-out "$out/run-$n-$mode.json")
    [[ $mode == test-speed ]] && flags+=(--test-speed) || flags+=(--gen-tokens "${GEN_TOKENS:-32}")
    "$bin" run "${flags[@]}" || fail "run N=$n $mode"
  done
done

echo "== 4. streamed vs resident, 7B"
check_dumps "--num-gpu-layers 8" "--num-gpu-layers 0" "--num-gpu-layers 12 --placement spread --slots 3" "--num-gpu-layers 4 --no-pin --no-prefetch"

finish
