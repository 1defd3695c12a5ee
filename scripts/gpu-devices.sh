#!/usr/bin/env bash
# Which card runs, on the lent GPU: --gpu by index, UUID and PCI bus id, and
# CUDA_VISIBLE_DEVICES, each checked for the card it names, its exit code and its one line.
# Uses the embedded model (no checkpoint). Exits non-zero on any failure.
#
# Usage: scripts/gpu-devices.sh   (dist/pack from `scripts/build-cuda.sh --tests --pack`)
source "$(dirname "$0")/gpu-env.sh"
uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
pci=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader | head -1)
echo "card: $uuid, PCI $pci"
short=${pci#0000}   # NVML's 8-digit domain; the tool takes any

# expect CODE PATTERN CMD...: runs CMD, checks its exit code and that PATTERN is in its output.
expect() {
  local code=$1 pattern=$2 got
  shift 2
  got=0
  "$@" > /tmp/out.txt 2>&1 || got=$?
  if [[ $got == "$code" ]] && grep -q -- "$pattern" /tmp/out.txt; then
    echo "ok: $* -> $got, '$pattern'"
  else
    fail "$* -> exit $got (want $code), '$pattern' not found: $(head -c 600 /tmp/out.txt)"
  fi
}

run=(run --gen-tokens 2 --prompt-len 4 -v)
expect 0 "running on GPU 0 .*PCI" "$bin" "${run[@]}" --gpu 0
expect 0 "running on GPU 0 .*PCI" "$bin" "${run[@]}" --gpu "$uuid"
expect 0 "running on GPU 0 .*PCI" "$bin" "${run[@]}" --gpu "${uuid:0:12}"
expect 0 "running on GPU 0 .*PCI" "$bin" "${run[@]}" --gpu "$short"
expect 0 "PCI" "$bin" auto --gpu "$uuid"
expect 0 "PCI" "$bin" auto --gpu "$short"
expect 1 "CUDA shows this process 1 GPU" "$bin" auto --gpu 3
expect 1 "CUDA shows this process 1 GPU" "$bin" "${run[@]}" --gpu GPU-00000000
export CUDA_VISIBLE_DEVICES=$uuid
expect 0 "running on GPU 0 .*PCI" "$bin" "${run[@]}" --gpu 0
export CUDA_VISIBLE_DEVICES=
expect 0 "no GPU: running on the CPU" "$bin" "${run[@]}"
expect 1 "CUDA shows this process no GPU (CUDA_VISIBLE_DEVICES=)" "$bin" "${run[@]}" --device cuda
unset CUDA_VISIBLE_DEVICES
finish
