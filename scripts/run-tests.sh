#!/usr/bin/env bash
# Set up .venv with the development extras, check style, then run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup-env.sh dev
.venv/bin/ruff check app tests benchmarks
.venv/bin/ruff format --check app tests benchmarks
exec .venv/bin/python -m pytest "$@"
