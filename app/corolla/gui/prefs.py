"""What the window remembers between runs (QSettings): geometry, the open pane, splitters, chat
parameters. Node-wide settings live in the node; these are this user's window preferences."""

from __future__ import annotations

from PySide6.QtCore import QSettings


def open_prefs(path: str | None = None) -> QSettings:
    """The user's preferences file, or an INI file at `path` (tests and screenshots use their own)."""
    if path:
        return QSettings(path, QSettings.Format.IniFormat)
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, "Corolla", "corolla-window")


def read_float(prefs: QSettings, key: str, default: float) -> float:
    try:
        return float(prefs.value(key, default))
    except (TypeError, ValueError):
        return default


def read_int(prefs: QSettings, key: str, default: int) -> int:
    try:
        return int(prefs.value(key, default))
    except (TypeError, ValueError):
        return default
