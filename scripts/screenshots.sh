#!/usr/bin/env bash
# Screenshots of every pane, light and dark, as a person sees them: the window runs under Xvfb (a real
# X server) against a fresh node with a real conversation and a private swarm of four servers (the
# node's own and three more `corolla serve` processes on loopback). Writes resources/screenshots/.
# Needs Debian's xvfb (apt-get install xvfb). Usage: scripts/screenshots.sh [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/resources/screenshots}"
[[ -x "$ROOT/.venv/bin/python" ]] || "$ROOT/scripts/setup-env.sh" dev >&2
DISPLAY_NUMBER=77
while [[ -e "/tmp/.X${DISPLAY_NUMBER}-lock" ]]; do DISPLAY_NUMBER=$((DISPLAY_NUMBER + 1)); done
Xvfb ":$DISPLAY_NUMBER" -screen 0 1400x900x24 -nolisten tcp >/dev/null 2>&1 &
XVFB=$!
trap 'kill $XVFB 2>/dev/null || true' EXIT
export DISPLAY=":$DISPLAY_NUMBER" QT_QPA_PLATFORM=xcb
"$ROOT/.venv/bin/python" "$ROOT/scripts/screenshots.py" "$OUT"
