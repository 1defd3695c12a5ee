#!/usr/bin/env bash
# Sourced by the GPU scripts: unpacks the carried CUDA build (dist/pack/*.gz, from
# scripts/build-cuda.sh --tests --pack) and sets $bin, $tests_dir, $out (the device tool's $OUT or
# ./gpu-results), $model (a 7B float8 checkpoint, synthesized here once: never carried).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

bin=dist/vibeoffload
if [[ -d dist/pack ]]; then
  mkdir -p /tmp/vibeoffload-dist/tests
  for f in dist/pack/*.gz; do
    name=$(basename "$f" .gz)
    case $name in
      vibeoffload) gunzip -c "$f" > /tmp/vibeoffload-dist/vibeoffload ;;
      *) gunzip -c "$f" > "/tmp/vibeoffload-dist/tests/$name" ;;
    esac
  done
  chmod +x /tmp/vibeoffload-dist/vibeoffload /tmp/vibeoffload-dist/tests/* 2>/dev/null || true
  bin=/tmp/vibeoffload-dist/vibeoffload
  tests_dir=/tmp/vibeoffload-dist/tests
else
  tests_dir=dist/tests
fi
results=$out/results.jsonl
: > "$results"
nvidia-smi --query-gpu=name,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current --format=csv
echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  date: $(date -u +%F)"

model=${MODEL_DIR:-/tmp/vibeoffload-7b}
mkdir -p "$model"
if [[ ! -f $model/vibevoice7b_float8_e4m3fn.safetensors ]]; then
  /usr/bin/time -f "synth: %e s, %M KB resident" "$bin" synth "$model/vibevoice7b_float8_e4m3fn.safetensors"
fi
