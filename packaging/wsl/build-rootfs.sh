#!/usr/bin/env bash
# Build the root filesystem of the "Corolla" WSL2 distro: Debian (minbase) plus the Linux bundle.
# On Windows the window runs natively and the node and block server run in this distro (hivemind
# has no Windows build); the installer imports it with
#   wsl.exe --import Corolla %LOCALAPPDATA%\Corolla\wsl corolla-wsl-rootfs.tar.gz --version 2
# GPU work uses CUDA in WSL: the Windows NVIDIA driver maps libcuda into the distro at
# /usr/lib/wsl/lib, which is why the bundle never ships a driver library.
#
# Usage (root, Linux): packaging/wsl/build-rootfs.sh [BUNDLE_DIR] [OUTPUT.tar.gz]
#   BUNDLE_DIR defaults to build/dist/corolla (packaging/build-linux.sh makes it); with
#   --no-bundle the distro is built without it (to check the recipe alone).
# Needs debootstrap and a Debian mirror (MIRROR, default deb.debian.org).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="${1:-$ROOT/build/dist/corolla}"
OUTPUT="${2:-$ROOT/build/packages/corolla-wsl-rootfs.tar.gz}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
TARGET="$ROOT/build/wsl-rootfs"
# Libraries the bundle loads from the system (the rest ship inside it); no GUI libraries: the window
# runs on Windows.
PACKAGES="ca-certificates,libgomp1,procps"

[[ "$(id -u)" == 0 ]] || { echo "build-rootfs: run as root (debootstrap and chroot need it)" >&2; exit 1; }
if [[ "$BUNDLE" != "--no-bundle" && ! -x "$BUNDLE/corolla" ]]; then
  echo "build-rootfs: no bundle at $BUNDLE; run packaging/build-linux.sh first (or pass --no-bundle)" >&2
  exit 1
fi

rm -rf "$TARGET"
mkdir -p "$TARGET" "$(dirname "$OUTPUT")"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$TARGET" "$MIRROR"

# The node runs as an ordinary user, never root; WSL logs in as the [user] default below.
chroot "$TARGET" useradd --create-home --shell /bin/bash --uid 1000 corolla
cp "$ROOT/packaging/wsl/wsl.conf" "$TARGET/etc/wsl.conf"
if [[ "$BUNDLE" != "--no-bundle" ]]; then
  cp -a "$BUNDLE" "$TARGET/opt/corolla"
  ln -sf /opt/corolla/corolla "$TARGET/usr/local/bin/corolla"
fi

# Smaller distro: no package lists, docs or caches.
chroot "$TARGET" apt-get clean
rm -rf "$TARGET"/var/lib/apt/lists/* "$TARGET"/usr/share/doc/* "$TARGET"/usr/share/man/* "$TARGET"/var/cache/*

tar --numeric-owner -C "$TARGET" -czf "$OUTPUT" .
echo "WSL root filesystem: $OUTPUT ($(du -h "$OUTPUT" | cut -f1))"
