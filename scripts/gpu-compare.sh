#!/usr/bin/env bash
# Compares two CUDA builds side by side on the lent GPU, in one process tree: the new build's
# GPU tests, streamed-vs-resident identity on 7B, both builds' 7B dumps, and `bench` of both
# builds alternating (old, new, old, new) so drift hits both alike. Exits non-zero when a test
# fails, a run fails, streamed and resident differ, the dumps of the two builds differ while
# SAME_DUMPS=1 (a refactor), or the new build is slower than the old by more than MAX_SLOWDOWN
# (default 0.03) at any layer count (median of the two rounds).
#
# Usage: scripts/gpu-compare.sh   (with dist/pack from `scripts/build-cuda.sh --tests --pack` and
#        the old build gzipped at $OLD, default dist/old/vibeoffload.gz)
# Env: LAYERS (default 28,20,8), SAME_DUMPS (0/1), MAX_SLOWDOWN, MODEL_DIR; TAG names this
#      comparison's files (to run several in one call); SKIP_TESTS=1 leaves out the GPU tests.
source "$(dirname "$0")/gpu-env.sh"

old=/tmp/vibeoffload-old-${TAG:-cmp}
gunzip -c "${OLD:-dist/old/vibeoffload.gz}" > "$old"
chmod +x "$old"
prefix=${TAG:+$TAG-}

if [[ -z ${SKIP_TESTS:-} ]]; then
  echo "== GPU tests (new build)"
  run_gpu_tests
fi

echo "== 7B dumps: streamed vs resident (new), and old vs new build"
ids=151,9707,11,1879,0,752,374,279,4128,315
for variant in "--no-offload" "--num-gpu-layers 8" "--num-gpu-layers 12 --placement spread --slots 3"; do
  tag=${variant// /_}
  for build in old new; do
    b=$bin
    [[ $build == old ]] && b=$old
    # shellcheck disable=SC2086
    "$b" run --device cuda --model-path "$model" $variant --input-ids "$ids" --dump "/tmp/dump-$build$tag.safetensors" > /dev/null ||
      fail "$build build: run $variant"
  done
  cmp -s "/tmp/dump-new--no-offload.safetensors" "/tmp/dump-new$tag.safetensors" ||
    fail "new build: $variant differs from resident"
  if cmp -s "/tmp/dump-old$tag.safetensors" "/tmp/dump-new$tag.safetensors"; then
    echo "old and new identical: $variant"
  elif [[ ${SAME_DUMPS:-0} == 1 ]]; then
    fail "old and new differ: $variant"
  else
    echo "old and new differ (allowed): $variant"
  fi
done

# `--json >` rather than `--json-out`: the old build may predate --json-out.
echo "== bench, old and new alternating (--layers ${LAYERS:=28,20,8})"
for round in 1 2; do
  for build in old new; do
    b=$bin
    [[ $build == old ]] && b=$old
    "$b" bench --device cuda --model-path "$model" --layers "$LAYERS" --json > "$out/${prefix}bench-$build-$round.json" ||
      fail "$build build: bench round $round"
  done
done

python3 - "$out" "${MAX_SLOWDOWN:-0.03}" "$prefix" <<'PY' || failed=1
import json, statistics, sys
out, limit, prefix = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def rows(build):
    runs = [json.load(open(f"{out}/{prefix}bench-{build}-{r}.json")) for r in (1, 2)]
    by_n = {}
    for r in runs:
        for x in r["rows"]:
            by_n.setdefault(x["gpu_layers"], []).append(x)
    return runs[0], by_n
old_run, old = rows("old")
_, new = rows("new")
print(f"{old_run['device']}, pinned {old_run['pinned_gbps']:.1f} GB/s, device {old_run['device_gbps']:.0f} GB/s")
print(f"{'N':>3} {'old ms/token':>13} {'new ms/token':>13} {'new/old':>8} {'old GPU ms':>11} {'new GPU ms':>11} {'old prefill':>12} {'new prefill':>12}")
bad = []
for n in sorted(old, reverse=True):
    med = lambda xs, k: statistics.median(x[k] for x in xs if x.get(k) is not None) if any(x.get(k) is not None for x in xs) else float("nan")
    o, w = med(old[n], "decode_ms_per_token"), med(new[n], "decode_ms_per_token")
    ratio = w / o
    print(f"{n:>3} {o:>13.2f} {w:>13.2f} {ratio:>8.3f} {med(old[n], 'decode_gpu_ms_per_token'):>11.2f} "
          f"{med(new[n], 'decode_gpu_ms_per_token'):>11.2f} {med(old[n], 'test_speed_ms'):>12.2f} {med(new[n], 'test_speed_ms'):>12.2f}")
    if ratio > 1 + limit:
        bad.append(n)
if bad:
    print(f"FAIL: new build slower than old by more than {limit:.0%} at N = {bad}")
    sys.exit(1)
PY

finish
echo "== all checks passed"
