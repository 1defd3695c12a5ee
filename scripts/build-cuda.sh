#!/usr/bin/env bash
# Build vibeoffload with candle's CUDA backend on a machine without GPU/driver/toolkit, using the
# wheel-based toolkit from scripts/cuda-toolkit.sh, and copy the results into dist/ for carrying
# to the GPU machine.
#
# Usage: scripts/build-cuda.sh [--tests] [extra cargo args...]
#   (always)   nvcc --ptx over src/engine/cuda/kernels/*.cu for compute_80/89/90 (fails on a kernel
#              that does not compile, without a GPU)
#   (default)  cargo build --release --features cuda --target-dir target/cuda  -> dist/vibeoffload
#   --tests    also cargo test --release --features cuda --no-run ...          -> dist/tests/<kind>-<name>
#              and run the CUDA module's unit tests, which need no GPU
#   --clippy   also cargo clippy --features cuda --all-targets -- -D warnings (CI cannot)
#   --pack     xz the binary and the GPU test binaries into dist/pack (to carry under 64 MiB)
#              (json-render-diagnostics: compile errors still show on stderr)
# Env: CUDA_COMPUTE_CAP (default 90 = H100/H200; 80 gives PTX the driver can JIT for newer cards),
#      VIBEOFFLOAD_CUDA_DIR (default <repo>/.cuda).
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || dirname "$script_dir")
cd "$repo"

tests=0
pack=0
clippy=0
cargo_args=()
for a in "$@"; do
  case $a in
    --tests) tests=1 ;;
    --pack) pack=1 ;;
    --clippy) clippy=1 ;;
    *) cargo_args+=("$a") ;;
  esac
done

cuda_dir=${VIBEOFFLOAD_CUDA_DIR:-$repo/.cuda}
root=$cuda_dir/root
if [[ ! -x $root/bin/nvcc || ! -e $root/lib64/libcuda.so ]]; then
  "$script_dir/cuda-toolkit.sh" "$cuda_dir" >/dev/null
fi

export CUDA_ROOT=$root
export PATH=$root/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "[build-cuda] CUDA_ROOT=$CUDA_ROOT CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP" >&2

# The launch geometry the engine compiles its kernels with (engine::cuda::kernel_defines builds
# the same -D options from the Rust constants; its unit test fails when the two differ).
kernel_defines=(-DMATVEC_WARPS=8 -DTILE_ROWS=16 -DTILE_INPUTS=64 -DMATVEC_MAX_ROWS=8 -DATT_WARPS=16 -DGEMM_BM=128 -DGEMM_BN=128 -DGEMM_BK=64 -DGEMM_STAGES=3 -DPREFILL_HEAD_DIM=128)
kernels=src/engine/cuda/kernels
for arch in 80 89 90; do
  for f in "$kernels"/*.cu; do
    if ! nvcc --ptx -arch="compute_$arch" "${kernel_defines[@]}" "$f" -o /dev/null; then
      echo "[build-cuda] $f does not compile for compute_$arch" >&2
      exit 1
    fi
  done
done
echo "[build-cuda] kernels compile for compute_80/89/90: $(cd "$kernels" && echo *.cu)" >&2

common=(--release --features cuda --target-dir target/cuda)
dist=$repo/dist
mkdir -p "$dist"

copy() { # src dst
  cp -f "$1" "$2"
  echo "[build-cuda] $2 ($(du -h "$2" | cut -f1))" >&2
}

if (( clippy )); then
  cargo clippy --features cuda --all-targets --target-dir target/cuda -- -D warnings
fi
cargo build "${common[@]}" ${cargo_args[@]+"${cargo_args[@]}"}
copy target/cuda/release/vibeoffload "$dist/vibeoffload"

if (( tests )); then
  json=$(mktemp)
  trap 'rm -f "$json"' EXIT
  cargo test "${common[@]}" --no-run --message-format=json-render-diagnostics ${cargo_args[@]+"${cargo_args[@]}"} > "$json"
  rm -rf "$dist/tests"
  mkdir -p "$dist/tests"
  # One line per test executable: "<kind>-<target name> <path>" (lib-vibeoffload, test-foo, ...).
  python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["profile"]["test"] and m.get("executable"):
        print(m["target"]["kind"][0] + "-" + m["target"]["name"], m["executable"])
' "$json" |
  while read -r name exe; do
    copy "$exe" "$dist/tests/$name"
  done
  # The CUDA module's unit tests need no GPU (NVRTC and the toolkit's libraries suffice): the
  # kernels compile with NVRTC, and kernel_defines above matches the Rust constants.
  LD_LIBRARY_PATH=$root/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$dist/tests/lib-vibeoffload" engine::cuda::tests
  echo "[build-cuda] on the GPU machine: export LD_LIBRARY_PATH=/usr/local/cuda/lib64:\$LD_LIBRARY_PATH" >&2
  echo "[build-cuda] integration tests find the binary via CARGO_BIN_EXE_vibeoffload=\$PWD/dist/vibeoffload" >&2
fi

if (( pack )); then
  rm -rf "$dist/pack"
  mkdir -p "$dist/pack"
  # xz: about half of gzip's size, which leaves room under the 64 MiB a call carries.
  xz -T2 -6 -c "$dist/vibeoffload" > "$dist/pack/vibeoffload.xz"
  # The GPU test binaries (tests/gpu*.rs), which carry no fixtures: the scripts run them from
  # the repository root, where they find tests/fixtures.
  for t in "$dist"/tests/test-gpu*; do
    [[ -e $t ]] && xz -T2 -6 -c "$t" > "$dist/pack/$(basename "$t").xz"
  done
  echo "[build-cuda] dist/pack: $(du -sh "$dist/pack" | cut -f1)" >&2
fi
