#!/usr/bin/env bash
# Set up .venv if needed, then run Corolla.
# With a display: the window (`corolla app`), which finds or starts the node. Without one (a server,
# a CI box, an ssh session): the offline end-to-end demo — `corolla node` with its embedded default (a
# private swarm on this computer serving a tiny demo model built offline, random weights: its text is
# noise) contributes its blocks, answers one chat through the OpenAI-compatible API, and shows the
# swarm and the stats. With arguments: the `corolla` command line (`./scripts/run-app.sh node`, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-env.sh" gui >&2
CORO="$ROOT/.venv/bin/corolla"
if [[ $# -gt 0 ]]; then
  exec "$CORO" "$@"
fi
if [[ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" || "$(uname)" == "Darwin" ]]; then
  exec "$CORO" app
fi
exec "$CORO" demo
