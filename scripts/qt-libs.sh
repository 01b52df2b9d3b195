# Sourced by run-app.sh: the system libraries Qt's xcb plugin (X11, and XWayland) needs, and which of
# them this computer lacks. A bare Debian/Ubuntu desktop lacks some, and Qt's own message names only
# the first.
QT_XCB_LIBS=(
  "libxcb-cursor.so.0:libxcb-cursor0" "libxcb-icccm.so.4:libxcb-icccm4" "libxcb-keysyms.so.1:libxcb-keysyms1"
  "libxcb-shape.so.0:libxcb-shape0" "libxcb-xinerama.so.0:libxcb-xinerama0" "libxcb-randr.so.0:libxcb-randr0"
  "libxcb-render-util.so.0:libxcb-render-util0" "libxcb-image.so.0:libxcb-image0"
  "libxkbcommon-x11.so.0:libxkbcommon-x11-0" "libEGL.so.1:libegl1" "libfontconfig.so.1:libfontconfig1"
  "libdbus-1.so.3:libdbus-1-3"
)

# The Debian package names of the missing libraries, space-separated (empty when none is missing).
# The linker cache is read once into a variable and matched in bash: `ldconfig -p | grep -q` under
# `set -o pipefail` fails with 141 whenever grep exits at its first match and ldconfig is still
# writing (SIGPIPE), which reported installed libraries as missing on some launches.
missing_qt_packages() {
  local entry known missing=()
  known="$(PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null || true)"
  for entry in "${QT_XCB_LIBS[@]}"; do
    [[ "$known" == *"${entry%%:*}"* ]] || missing+=("${entry##*:}")
  done
  echo "${missing[@]}"
}
