#!/usr/bin/env bash
# Build Corolla's Linux packages from a clean clone, then smoke-test them:
#   build/dist/corolla/                        the one-folder PyInstaller bundle
#   build/packages/corolla-V-linux-ARCH.tar.gz  the bundle as an archive (run ./corolla/corolla)
#   build/packages/corolla_V_ARCH.deb           /opt/corolla, `corolla` on PATH, menu entry, icon
# and runs `corolla --self-test` from the extracted archive, then checks that the .deb unpacked into a
# scratch root holds the same bundle and starts. Nothing here is committed (build/ is ignored).
#
# No AppImage: Debian ships neither appimagetool nor the AppImage type-2 runtime, and nothing outside
# the package registries can be downloaded here; the .tar.gz is the distribution-neutral package.
#
# Usage: packaging/build-linux.sh [--skip-self-test]
# Torch: the bundle ships the torch installed in .venv. For CUDA machines, install the CUDA build of
# torch into .venv first (the hosted CI workflow does); the build machine's driver libraries are
# filtered out by the spec.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SELF_TEST=1
[[ "${1:-}" == "--skip-self-test" ]] && SELF_TEST=0

started=$(date +%s)
# PyInstaller goes into the app's own venv: an overlay venv would collect torch's libraries twice.
# (Skipped when .venv already has it all, e.g. the test suite's dev venv in an offline namespace.)
if ! .venv/bin/python -c "import PyInstaller, PySide6, corolla" 2>/dev/null; then
  scripts/setup-env.sh gui
  .venv/bin/pip install -q "pyinstaller>=6.10,<7"
fi
VERSION="$(.venv/bin/python -c 'import corolla; print(corolla.__version__)')"
ARCH="$(dpkg --print-architecture 2>/dev/null || uname -m)"
BUILD="$ROOT/build"
BUNDLE="$BUILD/dist/corolla"
PACKAGES="$BUILD/packages"
rm -rf "$BUILD/dist" "$PACKAGES"
mkdir -p "$PACKAGES"

PYTHONWARNINGS=ignore .venv/bin/pyinstaller --noconfirm --log-level WARN \
  --distpath "$BUILD/dist" --workpath "$BUILD/work" packaging/corolla.spec

# p2pd must stay executable where hivemind looks for it.
P2PD="$(find "$BUNDLE" -path '*hivemind/hivemind_cli/p2pd' -type f | head -n1)"
[[ -n "$P2PD" ]] || { echo "build-linux: p2pd is missing from the bundle" >&2; exit 1; }
chmod 0755 "$P2PD"
build_seconds=$(( $(date +%s) - started ))

# --- .tar.gz -----------------------------------------------------------------------------------
TARBALL="$PACKAGES/corolla-$VERSION-linux-$ARCH.tar.gz"
tar -C "$BUILD/dist" -czf "$TARBALL" corolla

# --- .deb ----------------------------------------------------------------------------------------
STAGE="$BUILD/deb-root"
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$STAGE/opt" "$STAGE/usr/bin" "$STAGE/usr/share/applications" \
  "$STAGE/usr/share/icons/hicolor/512x512/apps" "$STAGE/usr/share/doc/corolla"
cp -a "$BUNDLE" "$STAGE/opt/corolla"
ln -s /opt/corolla/corolla "$STAGE/usr/bin/corolla"
cp resources/icons/corolla.png "$STAGE/usr/share/icons/hicolor/512x512/apps/corolla.png"
cp packaging/linux/corolla.desktop "$STAGE/usr/share/applications/corolla.desktop"
cp LICENSE "$STAGE/usr/share/doc/corolla/copyright"
installed_kb=$(du -sk "$STAGE" --exclude=DEBIAN | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@INSTALLED_KB@/$installed_kb/" \
  packaging/linux/control.in > "$STAGE/DEBIAN/control"
install -m 0755 packaging/linux/postinst packaging/linux/prerm "$STAGE/DEBIAN/"
DEB="$PACKAGES/corolla_${VERSION}_$ARCH.deb"
dpkg-deb --root-owner-group -Zxz -z1 --build "$STAGE" "$DEB" >/dev/null
rm -rf "$STAGE"

echo "{\"bundle\": \"$BUNDLE\", \"tarball\": \"$TARBALL\", \"deb\": \"$DEB\", \"build_seconds\": $build_seconds}" \
  > "$PACKAGES/build.json"
echo "built $TARBALL and $DEB in ${build_seconds}s"

# --- smoke tests on the extracted packages --------------------------------------------------------
if [[ "$SELF_TEST" == 1 ]]; then
  SCRATCH="$(mktemp -d)"
  trap 'rm -rf "$SCRATCH"' EXIT
  mkdir -p "$SCRATCH/tar" "$SCRATCH/deb-root"
  tar -C "$SCRATCH/tar" -xzf "$TARBALL"
  echo "self-test: extracted .tar.gz"
  "$SCRATCH/tar/corolla/corolla" --self-test
  rm -rf "$SCRATCH/tar"  # 1 GB: free it before unpacking the .deb
  # The .deb carries the same bundle byte for byte (checked here), so one full self-test is enough:
  # converting SmolLM2 a second time would prove nothing new. The unpacked copy must still start.
  dpkg -x "$DEB" "$SCRATCH/deb-root"
  echo "self-test: .deb unpacked into a scratch root"
  diff -r --no-dereference "$BUNDLE" "$SCRATCH/deb-root/opt/corolla" >/dev/null \
    || { echo "build-linux: the .deb's /opt/corolla differs from the bundle" >&2; exit 1; }
  [[ "$(readlink "$SCRATCH/deb-root/usr/bin/corolla")" == /opt/corolla/corolla ]] \
    || { echo "build-linux: the .deb's /usr/bin/corolla does not point at /opt/corolla/corolla" >&2; exit 1; }
  "$SCRATCH/deb-root/opt/corolla/corolla" --version
  echo "self-test: .deb payload equals the self-tested bundle and starts"
fi
