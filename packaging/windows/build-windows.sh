#!/usr/bin/env bash
# Build Corolla-Setup-<version>.exe on Windows (Git Bash; the hosted CI's windows runner runs it).
#   1. the window bundle (PySide6 only: no torch or hivemind on Windows) with PyInstaller;
#   2. the installer with Inno Setup 6 (iscc on PATH, or ISCC=path\to\ISCC.exe).
# Needs build/packages/corolla-wsl-rootfs.tar.gz from a Linux machine first:
#   packaging/build-linux.sh && sudo packaging/wsl/build-rootfs.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
ROOTFS="build/packages/corolla-wsl-rootfs.tar.gz"
[[ -f "$ROOTFS" ]] || { echo "build-windows: $ROOTFS is missing (build it on Linux first)" >&2; exit 1; }

PYTHON="${PYTHON:-python}"
VENV=".venv-window"
[[ -d "$VENV" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/Scripts/python.exe"
[[ -x "$PY" ]] || PY="$VENV/bin/python"
# The window needs only Qt, platformdirs and keyring; hivemind does not install on Windows at all.
"$PY" -m pip install -q "PySide6-Essentials>=6.7" "platformdirs>=4" "keyring>=24" "pyinstaller>=6.10,<7"
"$PY" -m pip install -q --no-deps -e .
VERSION="$("$PY" -c 'import corolla; print(corolla.__version__)')"

COROLLA_BUNDLE=window "$PY" -m PyInstaller --noconfirm --distpath build/dist --workpath build/work-window \
  packaging/corolla.spec
# Smoke test: the frozen window bundle starts and knows its version.
build/dist/Corolla/Corolla.exe --version

ISCC="${ISCC:-iscc}"
"$ISCC" "/DAppVersion=$VERSION" packaging/windows/corolla.iss
ls -l build/packages/
