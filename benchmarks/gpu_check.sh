#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the CUDA paths of fundusfm in at most 8 minutes.
#   bash benchmarks/gpu_check.sh --json gpu.json               # on a CUDA machine
#   bash benchmarks/gpu_check.sh --cpu-dry-run --json dry.json # the script itself, on a CPU
# Runs the repository's .venv when there is one, else the python on PATH (FUNDUSFM_PYTHON
# chooses another); paths on the command line stay relative to where it is called from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${FUNDUSFM_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
  else
    python="$(command -v python3 || command -v python || true)"
  fi
fi
if [[ -z "$python" ]]; then
  echo "gpu_check.sh: no python found (make $root/.venv or put python3 on PATH)" >&2
  exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m benchmarks.gpu_check "$@"
