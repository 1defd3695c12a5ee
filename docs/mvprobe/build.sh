#!/usr/bin/env bash
# Builds the probe here (nvcc from the project's toolkit, sm_90) into DIR (default dist/probe),
# with the CUDA runtime beside it. Usage: docs/mvprobe/build.sh [DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=$(mkdir -p "${1:-$repo/dist/probe}" && cd "${1:-$repo/dist/probe}" && pwd)
lib=$repo/.cuda/root/lib64
export PATH=$repo/.cuda/root/bin:$PATH
cd "$here"
sed 's/^#if __CUDA_ARCH__ >= 800/#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800/' \
  ../../src/engine/cuda/kernels/matvec.cu > "$out/matvec_host.cu"
nvcc -O3 -arch=sm_90 -std=c++17 -DMATVEC_WARPS=8 -DTILE_ROWS=16 -DTILE_INPUTS=64 -DMATVEC_MAX_ROWS=8 \
  -I"$out" -L"$lib" -cudart shared --cudadevrt none -Xlinker -rpath -Xlinker '$ORIGIN' \
  probe.cu -o "$out/probe"
cp -L "$lib/libcudart.so.13" "$out/"
