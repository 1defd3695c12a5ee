#!/usr/bin/env bash
# Where a resident frame's time goes, kernel by kernel: `ncu` times every kernel of a short
# `generate` (synthesized 7B float8, every layer resident, the speech components launched one
# by one) with the caches and clocks left as they run (no flush, no clock lock), and writes the
# raw table to $OUT/profile.csv.gz with a summary by kernel and launch shape.
#
# Usage: scripts/gpu-profile.sh   (dist/pack from `scripts/build-cuda.sh --pack`, the demo voices
#        and script in dist/voice)
# Env: FRAMES (default 3), STEPS (default 10), N (resident layers, default 28).
source "$(dirname "$0")/gpu-env.sh"

ncu=${NCU:-/usr/local/cuda/bin/ncu}
voice=dist/voice
echo "== ncu over generate, N=${N:-28}, ${FRAMES:-3} frames, no CUDA graphs"
"$ncu" --cache-control none --clock-control none --metrics gpu__time_duration.sum --csv \
  --print-units base --log-file /tmp/profile.csv \
  "$bin" generate --device cuda --model-path "$model" --num-gpu-layers "${N:-28}" --no-cuda-graphs \
  --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
  --force-frames "${FRAMES:-3}" --steps "${STEPS:-10}" --out /tmp/profile.wav --force \
  --json-out "$out/profile-generate.json" || fail "generate under ncu"
gzip -c /tmp/profile.csv > "$out/profile.csv.gz"
python3 - /tmp/profile.csv <<'EOF' || fail "summary"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 14]
head, rows = rows[0], rows[1:]
col = {n: i for i, n in enumerate(head)}
groups = collections.defaultdict(list)
for r in rows:
    if r[col["Metric Name"]] != "gpu__time_duration.sum":
        continue
    key = (r[col["Kernel Name"]][:48], r[col["Grid Size"]], r[col["Block Size"]])
    groups[key].append(float(r[col["Metric Value"]].replace(",", "")) / 1000.0)
total = sum(sum(v) for v in groups.values())
print(f"{len(rows)} kernels, {total / 1000:.1f} ms of kernel time")
print(f"{'kernel':48} {'grid':>14} {'block':>12} {'n':>6} {'mean us':>8} {'total ms':>9}")
for (name, grid, block), v in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:60]:
    print(f"{name:48} {grid:>14} {block:>12} {len(v):6} {sum(v) / len(v):8.1f} {sum(v) / 1000:9.2f}")
EOF
finish
