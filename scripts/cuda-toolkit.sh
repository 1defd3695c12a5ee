#!/usr/bin/env bash
# Install a CUDA 13.0 toolkit without root, from PyPI wheels, into <dest> (default <repo>/.cuda),
# and lay it out as one CUDA root (<dest>/root) that candle/cudarc/bindgen_cuda can build against.
# Idempotent: re-running skips what is already done. Usage: scripts/cuda-toolkit.sh [DEST]
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(git -C "$script_dir" rev-parse --show-toplevel 2>/dev/null || dirname "$script_dir")
dest=${1:-$repo/.cuda}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
venv=$dest/venv
root=$dest/root

# nvvm and crt pinned to the nvcc version: a newer nvvm emits PTX that the 13.0 ptxas/driver reject.
packages=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cublas==13.0.2.14
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand
  'nvidia-cuda-cccl==13.0.*'
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
)

log() { printf '[cuda-toolkit] %s\n' "$*" >&2; }

# 1. Wheels into a virtual environment (skipped when the stamp matches the package list).
stamp=$venv/.cuda-packages
if [[ -f $stamp && "$(cat "$stamp")" == "${packages[*]}" ]]; then
  log "wheels already installed in $venv"
else
  if [[ ! -x $venv/bin/python ]]; then
    log "creating venv $venv"
    python3 -m venv "$venv"
  fi
  log "installing CUDA 13.0 wheels (about 1.2 GB) into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}"
  printf '%s' "${packages[*]}" > "$stamp"
fi

cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
for d in bin include lib nvvm; do
  [[ -d $cu/$d ]] || { log "missing $cu/$d: the wheels did not install as expected"; exit 1; }
done
[[ -x $cu/bin/nvcc && -f $cu/include/cuda.h ]] || { log "nvcc or cuda.h missing under $cu"; exit 1; }

# 2. One root folder: bin, include, nvvm as links, a real lib64 with versioned and unversioned links.
mkdir -p "$root/lib64"
for d in bin include nvvm; do ln -sfn "$cu/$d" "$root/$d"; done
# `lib` too, for tools that look there; it points at the same lib64.
ln -sfn lib64 "$root/lib"
for f in "$cu"/lib/*.so*; do
  name=${f##*/}
  ln -sfn "$f" "$root/lib64/$name"
  base=${name%%.so*}.so          # libcublas.so.13 -> libcublas.so
  [[ -e $root/lib64/$base ]] || ln -sfn "$name" "$root/lib64/$base"
done
log "CUDA root laid out in $root"

# 3. Stub libcuda.so (soname libcuda.so.1): empty functions for every cu* name in cuda.h, enough
#    for `-lcuda` at link time; the real driver's libcuda.so.1 is loaded at run time.
stub=$root/lib64/libcuda.so
if [[ -f $stub && ! -L $stub && $stub -nt $cu/include/cuda.h ]]; then
  log "stub libcuda.so already built"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # Both the public names (cuFoo_v2 after macro expansion) and the legacy unsuffixed ones.
  { echo '#include <cuda.h>' | gcc -E -P -I"$cu/include" -x c -
    echo '#include <cuda.h>' | gcc -E -P -D__CUDA_API_VERSION_INTERNAL -I"$cu/include" -x c -
  } | grep -oE '\bcu[A-Za-z0-9_]+[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//' | sort -u > "$work/names"
  n=$(wc -l < "$work/names")
  (( n > 100 )) || { log "only $n cu* names found in cuda.h, refusing to build the stub"; exit 1; }
  sed -E 's/.*/void &(void) {}/' "$work/names" > "$work/cuda_stub.c"
  gcc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$work/libcuda.so" "$work/cuda_stub.c"
  rm -f "$stub" "$root/lib64/libcuda.so.1"
  mv "$work/libcuda.so" "$stub"
  ln -sfn libcuda.so "$root/lib64/libcuda.so.1"
  log "built stub $stub ($n symbols)"
fi

"$root/bin/nvcc" --version | tail -n 2 | head -n 1 | sed 's/^/[cuda-toolkit] nvcc: /' >&2

cat <<OUT
export CUDA_ROOT=$root
export PATH=$root/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
OUT
