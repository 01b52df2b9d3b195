#!/usr/bin/env bash
# Set up .venv if needed, then run the `corolla` command line with the given arguments.
# With no arguments: the offline end-to-end demo — starts `corolla node` with its embedded default (a
# private swarm on this computer serving a tiny demo model built offline, random weights: its text is
# noise), contributes its blocks, chats once through the node's OpenAI-compatible API, and shows the
# swarm and the stats. `./scripts/run-app.sh node` runs the node itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-env.sh" >&2
CORO="$ROOT/.venv/bin/corolla"
if [[ $# -gt 0 ]]; then
  exec "$CORO" "$@"
fi
exec "$CORO" demo
