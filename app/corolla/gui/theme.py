"""Light or dark, following the system (Qt's colour scheme hint), or forced by COROLLA_THEME.

Qt picks native colours on Windows and macOS; on Linux without a platform theme it stays light, so
the window applies a Fusion palette for the scheme the system asks for. Colours the panes paint
themselves (chat bubbles, the map, charts) come from `colours()` so they follow too."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication


@dataclass(frozen=True)
class Colours:
    dark: bool
    text: str
    muted: str
    base: str
    user_bubble: str
    assistant_bubble: str
    code_background: str
    border: str
    accent: str
    good: str
    warn: str
    bad: str


LIGHT = Colours(
    False,
    "#1d1d1f",
    "#6b6b70",
    "#ffffff",
    "#e8f0fe",
    "#f5f5f7",
    "#f0f0f3",
    "#d0d0d5",
    "#c0505e",
    "#2e9a5c",
    "#c98a0b",
    "#c0392b",
)
DARK = Colours(
    True,
    "#ececf0",
    "#a0a0a8",
    "#1e1f22",
    "#2b3a55",
    "#2a2b2f",
    "#17181a",
    "#3a3b40",
    "#e0707a",
    "#4cc27e",
    "#e0a526",
    "#e5605a",
)


_scheme: bool | None = None  # cached: painting asks for every item; apply() refreshes it


def is_dark() -> bool:
    global _scheme
    if _scheme is None:
        forced = os.environ.get("COROLLA_THEME", "").lower()
        if forced in ("dark", "light"):
            _scheme = forced == "dark"
        else:
            app = QGuiApplication.instance()
            _scheme = app is not None and app.styleHints().colorScheme() == Qt.ColorScheme.Dark
    return _scheme


def colours() -> Colours:
    return DARK if is_dark() else LIGHT


def apply(app: QApplication) -> Colours:
    """Style the application for the current scheme; call again when the system scheme changes."""
    global _scheme
    _scheme = None
    c = colours()
    app.setStyle("Fusion")
    palette = QPalette()
    if c.dark:
        window, base, text = QColor("#26272b"), QColor(c.base), QColor(c.text)
        for role, colour in (
            (QPalette.ColorRole.Window, window),
            (QPalette.ColorRole.WindowText, text),
            (QPalette.ColorRole.Base, base),
            (QPalette.ColorRole.AlternateBase, QColor("#2c2d31")),
            (QPalette.ColorRole.ToolTipBase, QColor("#303136")),
            (QPalette.ColorRole.ToolTipText, text),
            (QPalette.ColorRole.Text, text),
            (QPalette.ColorRole.Button, QColor("#303136")),
            (QPalette.ColorRole.ButtonText, text),
            (QPalette.ColorRole.Link, QColor("#7fb2ff")),
            (QPalette.ColorRole.Highlight, QColor("#4a6fa5")),
            (QPalette.ColorRole.HighlightedText, QColor("#ffffff")),
            (QPalette.ColorRole.PlaceholderText, QColor(c.muted)),
        ):
            palette.setColor(role, colour)
        palette.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.ButtonText, QColor("#6b6c72"))
        palette.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text, QColor("#6b6c72"))
        palette.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.WindowText, QColor("#6b6c72"))
    else:
        palette = app.style().standardPalette()
        palette.setColor(QPalette.ColorRole.Window, QColor("#f3f3f5"))
        palette.setColor(QPalette.ColorRole.Highlight, QColor("#3d6fd6"))
    app.setPalette(palette)
    return c
