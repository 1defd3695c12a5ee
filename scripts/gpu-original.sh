#!/usr/bin/env bash
# The original's commands as users type them, on the lent GPU, with a synthesized 7B float8
# checkpoint where the original looks (models/converted): a cold first load (the file dropped
# from the page cache, the driver's kernel cache emptied) whose phases must add up to at least
# 95% of its time; the design card's three commands; and the load report at N = 28, 8 and 0,
# where what NVML sees after loading and one step must be within 5% of the estimate's terms for
# what a load holds (context, weights, slots, both KV caches); the peak of the 1x128 speed test
# is printed beside the whole estimate, whose working-memory term is sized for a full-length
# prefill that these commands never run. Exits non-zero on any failure.
#
# Usage: scripts/gpu-original.sh   (dist/pack from `scripts/build-cuda.sh --tests --pack`)
source "$(dirname "$0")/gpu-env.sh"
out=$(realpath "$out")
bin=$(realpath "$bin")
file=$model/vibevoice7b_float8_e4m3fn.safetensors
work=/tmp/original
mkdir -p "$work/models/converted"
ln -sf "$file" "$work/models/converted/"
cd "$work"

echo "== cold first load, N=8"
sync
python3 -c "import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)" "$file"
rm -rf "$HOME/.nv/ComputeCache"
"$bin" --num-gpu-layers 8 --json > "$out/load-cold.json" || fail "cold load"
python3 - "$out/load-cold.json" <<'PY' || fail "cold load phases"
import json, sys
r = json.load(open(sys.argv[1]))
p = r["load_phases"]
names = ["device_ms", "kernels_ms", "page_in_ms", "pin_ms", "read_ms", "upload_ms", "non_layer_ms", "speech_ms"]
share = sum(p[n] for n in names) / r["load_ms"]
print("cold load %.0f ms: " % r["load_ms"] + ", ".join("%s %.0f" % (n[:-3], p[n]) for n in names) + "; phases %.1f%%" % (100 * share))
sys.exit(0 if share >= 0.95 else 1)
PY

echo "== vibeoffload --print-table"
"$bin" --print-table || fail "--print-table"
echo "== vibeoffload --auto --test-speed"
"$bin" --auto --test-speed || fail "--auto --test-speed"
echo "== vibeoffload --num-gpu-layers 8"
"$bin" --num-gpu-layers 8 || fail "--num-gpu-layers 8"

for n in 28 8 0; do
  "$bin" --num-gpu-layers "$n" --test-speed --json > "$out/load-$n.json" || fail "load N=$n"
done
python3 - "$out" <<'PY' || fail "estimate against what NVML saw"
import json, sys
bad = 0
for n in (28, 8, 0):
    r = json.load(open(f"{sys.argv[1]}/load-{n}.json"))
    e = r["estimate"]
    est, peak, loaded = e["total_bytes"], r["measured_peak_bytes"], r["measured_loaded_bytes"]
    held = est - e["working_bytes"] - e["margin_bytes"]
    off = held / loaded - 1
    print(f"N={n}: after load {loaded/2**30:.2f} GiB per NVML, estimate of what a load holds {held/2**30:.2f} GiB ({100*off:+.1f}%); "
          f"test-speed peak {peak/2**30:.2f} GiB, whole estimate {est/2**30:.2f} GiB; load {r['load_ms']:.0f} ms; "
          f"test-speed {r['test_speed']['avg_ms']:.2f} ms")
    bad |= abs(off) > 0.05
sys.exit(bad)
PY
finish
