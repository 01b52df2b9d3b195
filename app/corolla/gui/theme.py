"""Light or dark: the user's choice in the View menu (System, Light or Dark; COROLLA_THEME forces one),
System following the system's colour scheme hint.

Qt picks native colours on Windows and macOS; on Linux without a platform theme it stays light, so
the window applies a Fusion palette for the scheme the system asks for. Colours the panes paint
themselves (chat bubbles, the map, charts) come from `colours()` so they follow too."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QGuiApplication, QPainter, QPalette, QPen
from PySide6.QtWidgets import QApplication, QProxyStyle, QStyle

CHOICES = ("system", "light", "dark")


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
_choice = "system"  # the user's choice (the window's preferences keep it)
_style = None


def set_choice(choice: str) -> None:
    """ "system", "light" or "dark"; call apply() after it."""
    global _choice
    _choice = choice if choice in CHOICES else "system"


def choice() -> str:
    return _choice


def is_dark() -> bool:
    global _scheme
    if _scheme is None:
        forced = os.environ.get("COROLLA_THEME", "").lower()
        if forced not in ("dark", "light"):
            forced = _choice
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
    global _style
    if not isinstance(app.style(), IndicatorStyle):
        _style = IndicatorStyle("Fusion")  # held here too: Qt calls back into it for every indicator drawn
        app.setStyle(_style)
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
        # Fusion draws frames and groove edges from these: on dark, its defaults vanish into the window.
        for role, colour in (
            (QPalette.ColorRole.Light, "#505158"),
            (QPalette.ColorRole.Midlight, "#3c3d42"),
            (QPalette.ColorRole.Mid, "#2f3034"),
            (QPalette.ColorRole.Dark, "#18191b"),
            (QPalette.ColorRole.Shadow, "#0c0c0d"),
        ):
            palette.setColor(role, QColor(colour))
    else:
        palette = app.style().standardPalette()
        palette.setColor(QPalette.ColorRole.Window, QColor("#f3f3f5"))
        palette.setColor(QPalette.ColorRole.Highlight, QColor("#3d6fd6"))
    app.setPalette(palette)
    return c


INDICATORS = (QStyle.PrimitiveElement.PE_IndicatorCheckBox, QStyle.PrimitiveElement.PE_IndicatorRadioButton)
OUTLINED = (*INDICATORS, QStyle.PrimitiveElement.PE_PanelLineEdit)


class IndicatorStyle(QProxyStyle):
    """Fusion, with check box, radio button and text field outlines a person can see on dark (Fusion
    draws them a shade darker than the window, which on a dark window is close to black on near-black)."""

    def drawPrimitive(self, element, option, painter: QPainter, widget=None) -> None:
        super().drawPrimitive(element, option, painter, widget)
        if element not in OUTLINED or not is_dark():
            return
        if element == QStyle.PrimitiveElement.PE_PanelLineEdit and (widget is None or widget.parent() is None):
            return
        enabled = bool(option.state & QStyle.StateFlag.State_Enabled)
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.setPen(QPen(QColor("#9a9ba3" if enabled else "#55565c"), 1.2))
        rect = QRectF(option.rect).adjusted(0.6, 0.6, -0.6, -0.6)
        if element == QStyle.PrimitiveElement.PE_PanelLineEdit:
            painter.setPen(QPen(QColor("#4a4b52"), 1))  # a text field's edge, quieter than a check box's
            painter.drawRoundedRect(rect, 2, 2)
        elif element == QStyle.PrimitiveElement.PE_IndicatorRadioButton:
            painter.drawEllipse(rect)
        else:
            painter.drawRoundedRect(rect, 2, 2)
        painter.restore()
