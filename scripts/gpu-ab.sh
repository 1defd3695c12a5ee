#!/usr/bin/env bash
# A/B on one lent GPU: the GPU tests of this build, then a baseline binary and this one run
# alternately (resident `bench` decode and a resident 64-frame `generate`), a line per run, so
# that a change is measured against its base on the same machine (hosts differ by several
# percent, and one host's frames by as much).
#
# Usage: scripts/gpu-ab.sh   (dist/pack from `scripts/build-cuda.sh --tests --pack`, the demo
#        voices and script in dist/voice, the baseline in dist/base/vibeoffload.xz)
# The baseline, built from a commit here (the shared target directory keeps it to a minute):
#   git worktree add ../base COMMIT && (cd ../base && CUDA_ROOT=$PWD/../main/.cuda/root \
#     CUDA_COMPUTE_CAP=90 cargo build --release --features cuda --target-dir ../main/target/cuda)
#   mkdir -p dist/base && xz -T2 -c target/cuda/release/vibeoffload > dist/base/vibeoffload.xz
# Env: ROUNDS (default "1 2 3"), FRAMES (default 64), SKIP_TESTS=1; ALT="NAME ..." also runs
#      dist/alt/NAME.xz (other builds of this tree) in each round; the runs' JSON go to
#      $OUT/ab.tgz, and a last line per build gives its means over the rounds.
source "$(dirname "$0")/gpu-env.sh"
export VIBEOFFLOAD_7B=$model/vibevoice7b_float8_e4m3fn.safetensors
if [[ -z ${SKIP_TESTS:-} ]]; then run_gpu_tests; fi
[[ -f dist/base/vibeoffload.xz ]] || { echo "no baseline: dist/base/vibeoffload.xz"; exit 1; }
xz -dc dist/base/vibeoffload.xz > /tmp/base-vibeoffload && chmod +x /tmp/base-vibeoffload
for name in ${ALT:-}; do
  xz -dc "dist/alt/$name.xz" > "/tmp/alt-$name" && chmod +x "/tmp/alt-$name"
done
voice=dist/voice
mkdir -p /tmp/ab
for round in ${ROUNDS:-1 2 3}; do
  for which in base new ${ALT:-}; do
    case $which in
      base) b=/tmp/base-vibeoffload ;;
      new) b=$bin ;;
      *) b=/tmp/alt-$which ;;
    esac
    "$b" bench --device cuda --model-path "$model" --layers 28 \
      --json-out "/tmp/ab/bench-$which-$round.json" > /tmp/bench.log 2>&1 ||
      { tail -3 /tmp/bench.log; fail "bench ($which, round $round)"; continue; }
    "$b" generate --device cuda --model-path "$model" --num-gpu-layers 28 \
      --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
      --force-frames "${FRAMES:-64}" --steps 10 --out /tmp/ab.wav --force \
      --json-out "/tmp/ab/generate-$which-$round.json" > /tmp/gen.log 2>&1 ||
      { tail -5 /tmp/gen.log; fail "generate ($which, round $round)"; continue; }
    python3 - "/tmp/ab/bench-$which-$round.json" "/tmp/ab/generate-$which-$round.json" "$which" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))['rows'][0]
g = json.load(open(sys.argv[2]))
t, f = g['timings'], g['frames']
print(f"{sys.argv[3]:8} {g['tool'].split('(')[-1].rstrip(')')}: decode {b['decode_ms_per_token']:.3f} ms/token, "
      f"test-speed {b['test_speed_ms']:.2f} ms | RTF {g['real_time_factor']:.4f}, prefill "
      f"{t['prefill_ms']:.1f} ms; per frame LM pair "
      f"{t['lm_ms'] / f:.2f}, head {t['head_ms'] / f:.2f}, decoder {t['decoder_ms'] / f:.2f}, "
      f"semantic {t['semantic_ms'] / f:.2f} ms")
PY
  done
done
# Each build's means over the rounds, and the ratio of its RTF to the baseline's.
python3 - /tmp/ab base new ${ALT:-} <<'PY' || fail "summary"
import glob, json, statistics, sys
d, builds = sys.argv[1], sys.argv[2:]
rtf = {}
for w in builds:
    gens = [json.load(open(f)) for f in sorted(glob.glob(f"{d}/generate-{w}-*.json"))]
    benches = [json.load(open(f))['rows'][0] for f in sorted(glob.glob(f"{d}/bench-{w}-*.json"))]
    if not gens or not benches:
        continue
    mean = lambda xs: statistics.fmean(xs)
    rtf[w] = mean([g['real_time_factor'] for g in gens])
    part = lambda k: mean([g['timings'][k] / g['frames'] for g in gens])
    ratio = f" ({rtf[w] / rtf['base']:.3f}x base)" if 'base' in rtf and w != 'base' else ""
    print(f"mean {w:8} ({len(gens)} rounds): decode {mean([b['decode_ms_per_token'] for b in benches]):.3f} ms/token, "
          f"test-speed {mean([b['test_speed_ms'] for b in benches]):.2f} ms | RTF {rtf[w]:.4f}{ratio}; per frame LM pair "
          f"{part('lm_ms'):.2f}, head {part('head_ms'):.2f}, decoder {part('decoder_ms'):.2f}, semantic {part('semantic_ms'):.2f} ms")
PY
tar czf "$out/ab.tgz" -C /tmp ab
finish
