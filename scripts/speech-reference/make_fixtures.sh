#!/usr/bin/env bash
# Regenerates tests/fixtures/speech from the original PyTorch VibeVoice code (CPU, float32).
#
#   scripts/speech-reference/make_fixtures.sh [--venv PATH] [make_fixtures.py options...]
#
# --venv PATH   the virtual environment to use; created there (pinned versions) if it is missing.
# Without --venv: /work/venv-ref if it exists, else $VIBEVOICE_REF_VENV, else
# ${XDG_CACHE_HOME:-~/.cache}/vibeoffload/venv-speech-ref (created if missing).
# Creating one downloads torch 2.6.0 and its CUDA wheels from PyPI (several GB); only the CPU is used.
# PYTHON names the interpreter that creates it (default python3; 3.11 was used).
#
# Other options go to make_fixtures.py, e.g. --out DIR (default tests/fixtures/speech) and
# --compare-to DIR (compare what was written with the fixtures in DIR).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

venv=""
if [[ "${1:-}" == "--venv" ]]; then
  [[ $# -ge 2 ]] || { echo "make_fixtures.sh: --venv needs a path" >&2; exit 2; }
  venv="$2"
  shift 2
elif [[ -x /work/venv-ref/bin/python ]]; then
  venv=/work/venv-ref
else
  venv="${VIBEVOICE_REF_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/vibeoffload/venv-speech-ref}"
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "make_fixtures.sh: creating the reference environment in $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --upgrade pip
  "$venv/bin/python" -m pip install -r "$here/requirements.txt"
  # The wheel's own dependency pins pull gradio, av, aiortc, numba...: none is needed here.
  "$venv/bin/python" -m pip install --no-deps vibevoice==0.0.1
fi

cd "$repo"
exec "$venv/bin/python" "$here/make_fixtures.py" "$@"
