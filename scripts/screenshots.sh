#!/usr/bin/env bash
# Run the window under Xvfb (a real X server, as a person would see it) against a fresh node serving
# the offline demo model, and save a screenshot of each pane to resources/screenshots/.
# Needs Debian's xvfb (apt-get install xvfb). Usage: scripts/screenshots.sh [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/resources/screenshots}"
"$ROOT/scripts/setup-env.sh" dev >&2
export COROLLA_HOME="$(mktemp -d)"
Xvfb :77 -screen 0 1280x800x24 >/dev/null 2>&1 &
XVFB=$!
"$ROOT/.venv/bin/corolla" node >"$COROLLA_HOME/node.log" 2>&1 &
NODE=$!
trap 'kill $NODE 2>/dev/null; wait $NODE 2>/dev/null; kill $XVFB 2>/dev/null; rm -rf "$COROLLA_HOME"' EXIT
for _ in $(seq 1 120); do [[ -f "$COROLLA_HOME/config/node.json" ]] && break; sleep 0.5; done
URL=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['url'])" "$COROLLA_HOME/config/node.json")
DISPLAY=:77 QT_QPA_PLATFORM=xcb "$ROOT/.venv/bin/python" "$ROOT/scripts/screenshots.py" "$URL" \
  "$(cat "$COROLLA_HOME/config/api-token")" "$OUT"
