#!/usr/bin/env bash
# Set up .venv if needed, then run the `corolla` command line with the given arguments.
# With no arguments: an offline demo of the model engine — builds a tiny random-weight model (its
# output is noise) and generates through it split into spans, exactly as swarm servers would run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-env.sh" >&2
CORO="$ROOT/.venv/bin/corolla"
if [[ $# -gt 0 ]]; then
  exec "$CORO" "$@"
fi
DEMO="${XDG_CACHE_HOME:-$HOME/.cache}/corolla/demo-tiny-llama"
[[ -f "$DEMO/config.json" ]] || "$CORO" model make-tiny llama "$DEMO" --dht-prefix corolla-demo-tiny >/dev/null
"$CORO" --version
"$CORO" model info "$DEMO"
echo "--- generating through 3 spans (random weights: the text is noise) ---"
exec "$CORO" model generate "$DEMO" --prompt "Hello, swarm!" --max-new-tokens 24 --spans 3
