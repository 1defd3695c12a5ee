#!/usr/bin/env bash
# Sourced by the GPU scripts: unpacks the carried CUDA build (dist/pack/*.xz, from
# scripts/build-cuda.sh --tests --pack) and sets $bin, $tests_dir, $out (the device tool's $OUT or
# ./gpu-results), $model (a 7B float8 checkpoint, synthesized here once: never carried). Defines
# fail (note a failure and go on), regression (note a bench slower than its baseline and go on),
# finish (exit 1 after any failure, else 3 after a regression), run_gpu_tests and check_dumps.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

bin=dist/vibeoffload
if [[ -d dist/pack ]]; then
  mkdir -p /tmp/vibeoffload-dist/tests
  for f in dist/pack/*.xz; do
    name=$(basename "$f" .xz)
    case $name in
      vibeoffload) target=/tmp/vibeoffload-dist/vibeoffload ;;
      *) target=/tmp/vibeoffload-dist/tests/$name ;;
    esac
    xz -dc "$f" > "$target"
    chmod +x "$target"
  done
  bin=/tmp/vibeoffload-dist/vibeoffload
  tests_dir=/tmp/vibeoffload-dist/tests
else
  tests_dir=dist/tests
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current --format=csv
echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  date: $(date -u +%F)"

model=${MODEL_DIR:-/tmp/vibeoffload-7b}
mkdir -p "$model"
if [[ ! -f $model/vibevoice7b_float8_e4m3fn.safetensors ]]; then
  /usr/bin/time -f "synth: %e s, %M KB resident" "$bin" synth "$model/vibevoice7b_float8_e4m3fn.safetensors"
fi

failed=0
regressed=0
fail() { echo "FAIL: $*"; failed=1; }
regression() { echo "REGRESSION: $*"; regressed=1; }
# A failure outranks a regression: the figures of a broken run say little.
finish() {
  if (( failed )); then
    echo "== FAILED"
    exit 1
  fi
  if (( regressed )); then
    echo "== SLOWER THAN THE BASELINE"
    exit 3
  fi
}

# Runs every GPU test binary, one test at a time, and prints each test's line.
run_gpu_tests() {
  local t
  for t in "$tests_dir"/*; do
    [[ -x $t ]] || continue
    echo "-- $(basename "$t")"
    "$t" --test-threads=1 > /tmp/test.log 2>&1 || fail "$(basename "$t")"
    grep -E "^test |test result|worst|^bench:" /tmp/test.log || :
    grep -E -A1 "panicked" /tmp/test.log || :
  done
}

# One 7B forward pass with every layer resident, then one per streamed variant given (flags in
# one word each): each variant's dump of hidden states and logits must equal the resident one.
check_dumps() {
  local ids=151,9707,11,1879,0,752,374,279,4128,315 variant
  "$bin" run --device cuda --model-path "$model" --no-offload --input-ids "$ids" \
    --dump /tmp/dump-resident.safetensors > /dev/null || fail "resident run"
  for variant in "$@"; do
    # shellcheck disable=SC2086
    "$bin" run --device cuda --model-path "$model" $variant --input-ids "$ids" \
      --dump /tmp/dump-streamed.safetensors > /dev/null || fail "run $variant"
    if cmp -s /tmp/dump-resident.safetensors /tmp/dump-streamed.safetensors; then
      echo "identical: $variant"
    else
      fail "DIFFERENT: $variant"
    fi
  done
}
