#!/usr/bin/env bash
# Set up .venv with the development extras and the stock Petals reference environment (for the
# interop tests), check style, then run the whole test suite. Where this user may create network
# namespaces (root), pytest runs in one that has only loopback, so no test traffic can leave the machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup-env.sh dev
REF="${COROLLA_PETALSREF_SRC:-$ROOT/../shared/reference-petals}"
REF_PY="${PETALSREF:-${XDG_CACHE_HOME:-$HOME/.cache}/corolla-petalsref}/venv/bin/python"
if [[ -f "$REF/build_env.sh" && ! -x "$REF_PY" ]]; then
  echo "building the stock Petals 2.2 reference environment (once)..." >&2
  bash "$REF/build_env.sh" >&2
fi
# Qt's offscreen platform needs a few system libraries (GL, EGL, xkbcommon, fontconfig, D-Bus).
if ! QT_QPA_PLATFORM=offscreen .venv/bin/python -c "from PySide6.QtWidgets import QApplication; QApplication([])" \
    >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing the system libraries Qt needs..." >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgl1 libegl1 libxkbcommon0 \
    libfontconfig1 libdbus-1-3 libglib2.0-0 >&2
fi
# The network lab (corolla/testing/netlab.py) builds NAT routers with iptables; its tests skip without it.
if ! command -v iptables >/dev/null && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing iptables for the network lab..." >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables >&2
fi
# The lab's "router opens the port on request" story runs Debian's miniupnpd in a home router; it skips
# without it. Installed, not started: the lab runs its own copy inside the namespace.
if [[ ! -x /usr/sbin/miniupnpd ]] && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing miniupnpd for the network lab..." >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq miniupnpd >&2 || true
fi
.venv/bin/ruff check app tests benchmarks packaging
.venv/bin/ruff format --check app tests benchmarks packaging
# Most tests wait on processes and sockets rather than compute, so two pytest-xdist workers (one test
# file at a time each, so a file's module-scoped swarm or lab is built once) roughly halve the wall time
# on 2 cores. COROLLA_TEST_WORKERS=0 runs everything in one process; a later `-n` on the command line wins.
WORKERS=(-n "${COROLLA_TEST_WORKERS:-2}" --dist loadfile)
if [[ "$(id -u)" == 0 ]] && command -v ip >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/python -m pytest "${WORKERS[@]}" "$@"
fi
exec .venv/bin/python -m pytest "${WORKERS[@]}" "$@"
