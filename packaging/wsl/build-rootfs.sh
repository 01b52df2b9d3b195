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
#   --no-bundle the distro is built without it (to check the recipe alone). With the bundle, its
#   self-test runs inside the new root as the distro's user (SKIP_SELF_TEST=1 skips it).
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

# A crashed earlier run may have left /dev and /proc mounted inside: unmount before deleting, and
# never let rm cross into another file system.
umount -R "$TARGET/dev" "$TARGET/proc" 2>/dev/null || true
rm -rf --one-file-system "$TARGET"
mkdir -p "$TARGET" "$(dirname "$OUTPUT")"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$TARGET" "$MIRROR"

# The node runs as an ordinary user, never root; WSL logs in as the [user] default below.
chroot "$TARGET" useradd --create-home --shell /bin/bash --uid 1000 corolla
cp "$ROOT/packaging/wsl/wsl.conf" "$TARGET/etc/wsl.conf"
if [[ "$BUNDLE" != "--no-bundle" ]]; then
  cp -a "$BUNDLE" "$TARGET/opt/corolla"
  ln -sf /opt/corolla/corolla "$TARGET/usr/local/bin/corolla"
fi

# Smoke test inside the distro as WSL will run it: the corolla user, the bundle from /opt/corolla.
if [[ "$BUNDLE" != "--no-bundle" && "${SKIP_SELF_TEST:-0}" != 1 ]]; then
  mount -t proc proc "$TARGET/proc"
  mount --rbind /dev "$TARGET/dev"
  trap 'umount -R "$TARGET/dev" "$TARGET/proc" 2>/dev/null || true' EXIT
  chroot --userspec=corolla:corolla "$TARGET" env -i HOME=/home/corolla PATH=/usr/local/bin:/usr/bin:/bin \
    corolla --self-test
  # The self-test's last processes (p2pd) may take a moment to let go of /dev.
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    umount -R "$TARGET/dev" "$TARGET/proc" 2>/dev/null && break
    sleep 1
  done
  if mountpoint -q "$TARGET/dev" || mountpoint -q "$TARGET/proc"; then
    echo "build-rootfs: /dev or /proc is still mounted in $TARGET; not packing it" >&2
    exit 1
  fi
  trap - EXIT
fi

# Smaller distro: no package lists, docs or caches.
chroot "$TARGET" apt-get clean
rm -rf "$TARGET"/var/lib/apt/lists/* "$TARGET"/usr/share/doc/* "$TARGET"/usr/share/man/* "$TARGET"/var/cache/*

tar --numeric-owner -C "$TARGET" -czf "$OUTPUT" .
echo "WSL root filesystem: $OUTPUT ($(du -h "$OUTPUT" | cut -f1))"
