#!/usr/bin/env bash
# Build Corolla.app and Corolla-<version>-macos-<arch>.dmg on a Mac (one per architecture: run it on
# an Apple-silicon Mac for arm64 and on an Intel Mac for x86_64; the hosted CI has a runner of each).
#
# Signing and notarisation run when these are set (both are skipped otherwise, for local builds):
#   MAC_SIGN_IDENTITY   "Developer ID Application: NAME (TEAMID)", in the login keychain
#   MAC_NOTARY_PROFILE  a notarytool keychain profile, made once with:
#                         xcrun notarytool store-credentials corolla-notary \
#                           --apple-id YOU@example.com --team-id TEAMID --password APP-SPECIFIC-PASSWORD
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
ARCH="$(uname -m)"

scripts/setup-env.sh gui
.venv/bin/pip install -q "pyinstaller>=6.10,<7"
VERSION="$(.venv/bin/python -c 'import corolla; print(corolla.__version__)')"
.venv/bin/pyinstaller --noconfirm --distpath build/dist --workpath build/work packaging/corolla.spec
APP="build/dist/Corolla.app"
find "$APP" -path '*hivemind_cli/p2pd' -type f -exec chmod 0755 {} +  # p2pd must stay executable

# 1. Sign every binary inside out (p2pd and the dylibs first, the app last) with the hardened runtime.
if [[ -n "${MAC_SIGN_IDENTITY:-}" ]]; then
  ENTITLEMENTS="packaging/macos/entitlements.plist"
  find "$APP/Contents" -type f \( -name '*.dylib' -o -name '*.so' -o -name 'p2pd' -o -perm -u+x \) -print0 |
    xargs -0 codesign --force --timestamp --options runtime --entitlements "$ENTITLEMENTS" \
      --sign "$MAC_SIGN_IDENTITY"
  codesign --force --timestamp --options runtime --entitlements "$ENTITLEMENTS" --sign "$MAC_SIGN_IDENTITY" "$APP"
  codesign --verify --deep --strict --verbose=2 "$APP"
fi

# 2. Smoke test: the bundled node serves the demo model and answers a chat through the swarm.
"$APP/Contents/MacOS/corolla" --self-test

# 3. The disk image: the app next to a link to /Applications, compressed.
mkdir -p build/packages
STAGE="$(mktemp -d)"
cp -R "$APP" "$STAGE/"
ln -s /Applications "$STAGE/Applications"
DMG="build/packages/Corolla-$VERSION-macos-$ARCH.dmg"
rm -f "$DMG"
hdiutil create -volname "Corolla" -srcfolder "$STAGE" -ov -format UDZO "$DMG"
rm -rf "$STAGE"

# 4. Notarise the signed image and staple the ticket, so Gatekeeper opens it offline too.
if [[ -n "${MAC_SIGN_IDENTITY:-}" ]]; then
  codesign --force --timestamp --sign "$MAC_SIGN_IDENTITY" "$DMG"
  if [[ -n "${MAC_NOTARY_PROFILE:-}" ]]; then
    xcrun notarytool submit "$DMG" --keychain-profile "$MAC_NOTARY_PROFILE" --wait
    xcrun stapler staple "$DMG"
    spctl --assess --type open --context context:primary-signature --verbose "$DMG"
  fi
fi
echo "built $DMG"
