#!/usr/bin/env bash
# Shared by scripts/serve and scripts/test: make .venv and install the project into it, once.
# torch is pinned to 2.13.0: on a GPU machine pip takes PyPI's CUDA build, on a CPU-only machine with a
# local CPU wheel (find-links) it takes that. Set PARTICALIZE_TORCH_SPEC to choose another build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PARTICALIZE_VENV:-$root/.venv}"
extras="${1:-}"
stamp="$venv/.particalize-installed$extras"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "${PARTICALIZE_TORCH_SPEC:-torch==2.13.0}"
  fi
  "$venv/bin/python" -m pip install -q -e "$root$extras"
  touch "$stamp"
fi
