#!/usr/bin/env bash
# generate on the lent GPU: the GPU tests, then a synthesized 7B float8 checkpoint speaking a
# two-speaker script in two demo voices with a forced schedule of frames (random weights choose
# arbitrarily), for each layer count: the report's real-time factor and time per part.
#
# Usage: scripts/gpu-generate.sh   (dist/pack from `scripts/build-cuda.sh --tests --pack`, the
#        demo voices and script in dist/voice)
# Env: LAYER_COUNTS (default "28 8"), FRAMES (default 64), STEPS (default 10); SEPARATE=N also
#      runs N with --separate-cfg-passes (the fork's two passes), to compare with the shared one;
#      SLOTS="N:S ..." also runs N layers with S stream slots; EAGER="N ..." also runs each N with
#      --no-cuda-graphs (the speech components launched one by one), to compare with the graphs;
#      OFFLOAD_HEAD="N ..." also runs each N with --offload-prediction-head (the diffusion head
#      on the CPU), to compare its time per frame and VRAM with the head on the GPU;
#      BENCH_SPEECH=1 also runs `bench --speech` over LAYER_COUNTS (table, bench-speech.json and
#      bench-speech.svg).
source "$(dirname "$0")/gpu-env.sh"

echo "== GPU tests (the speech benchmark on the 7B float8 checkpoint)"
export VIBEOFFLOAD_7B=$model/vibevoice7b_float8_e4m3fn.safetensors
run_gpu_tests

voice=dist/voice
for n in ${LAYER_COUNTS:-28 8}; do
  echo "-- generate, N=$n"
  "$bin" generate --device cuda --model-path "$model" --num-gpu-layers "$n" \
    --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
    --force-frames "${FRAMES:-64}" --steps "${STEPS:-10}" --out "/tmp/gen-$n.wav" --force \
    --json-out "$out/generate-$n.json" || fail "generate N=$n"
done
if [[ -n ${SEPARATE:-} ]]; then
  echo "-- generate, N=$SEPARATE, separate guidance passes"
  "$bin" generate --device cuda --model-path "$model" --num-gpu-layers "$SEPARATE" --separate-cfg-passes \
    --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
    --force-frames "${FRAMES:-64}" --steps "${STEPS:-10}" --out "/tmp/gen-sep.wav" --force \
    --json-out "$out/generate-$SEPARATE-separate.json" || fail "generate N=$SEPARATE separate"
fi
for n in ${EAGER:-}; do
  echo "-- generate, N=$n, without CUDA graphs"
  "$bin" generate --device cuda --model-path "$model" --num-gpu-layers "$n" --no-cuda-graphs \
    --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
    --force-frames "${FRAMES:-64}" --steps "${STEPS:-10}" --out "/tmp/gen-$n-eager.wav" --force \
    --json-out "$out/generate-$n-eager.json" || fail "generate N=$n without graphs"
done
for n in ${OFFLOAD_HEAD:-}; do
  echo "-- generate, N=$n, the diffusion head on the CPU"
  "$bin" generate --device cuda --model-path "$model" --num-gpu-layers "$n" --offload-prediction-head \
    --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
    --force-frames "${FRAMES:-64}" --steps "${STEPS:-10}" --out "/tmp/gen-$n-offload-head.wav" --force \
    --json-out "$out/generate-$n-offload-head.json" || fail "generate N=$n --offload-prediction-head"
done
for pair in ${SLOTS:-}; do
  n=${pair%%:*} slots=${pair##*:}
  echo "-- generate, N=$n, $slots slots"
  "$bin" generate --device cuda --model-path "$model" --num-gpu-layers "$n" --slots "$slots" \
    --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
    --force-frames "${FRAMES:-64}" --steps "${STEPS:-10}" --out "/tmp/gen-$n-$slots.wav" --force \
    --json-out "$out/generate-$n-slots$slots.json" || fail "generate N=$n slots=$slots"
done
if [[ -n ${BENCH_SPEECH:-} ]]; then
  layers=${LAYER_COUNTS:-28 8}
  echo "-- bench --speech, N=${layers// /,}"
  "$bin" bench --speech --device cuda --model-path "$model" --layers "${layers// /,}" \
    --script "$voice/2p_short.txt" --voice "$voice/en-Alice_woman.wav" --voice "$voice/en-Frank_man.wav" \
    --force-frames "${FRAMES:-64}" --steps "${STEPS:-10}" \
    --json-out "$out/bench-speech.json" --plot "$out/bench-speech.svg" || fail "bench --speech"
fi
finish
