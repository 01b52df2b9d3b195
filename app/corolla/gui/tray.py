"""The tray icon: Corolla's flower tinted by the contribution state, a status line, and the menu
(open, chat, pause/resume, quit)."""

from __future__ import annotations

import math
from collections.abc import Callable

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QAction, QBrush, QColor, QIcon, QPainter, QPen, QPixmap
from PySide6.QtWidgets import QMenu, QSystemTrayIcon, QWidget

PETALS = {  # petal colour per tray state; the core stays yellow
    "contributing": "#e0707a",
    "paused": "#e0a526",
    "error": "#c0392b",
    "idle": "#9a9aa0",
    "unreachable": "#9a9aa0",
}
CORE = "#f4c542"
SIZES = (16, 20, 22, 24, 32, 40, 48, 64, 128)


def tray_state(contribution_state: str | None) -> str:
    """contributing | paused | error | idle | unreachable (the node does not answer)."""
    if contribution_state is None:
        return "unreachable"
    if contribution_state in ("online", "starting", "loading"):
        return "contributing"
    if contribution_state == "paused":
        return "paused"
    if contribution_state in ("restarting", "failed"):
        return "error"
    return "idle"


def _flower(size: int, petal: str, crossed: bool) -> QPixmap:
    pixmap = QPixmap(size, size)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    centre = QPointF(size / 2, size / 2)
    colour = QColor(petal)
    painter.setPen(QPen(colour.darker(140), max(1.0, size / 40)))
    painter.setBrush(QBrush(colour))
    for i in range(5):
        angle = -math.pi / 2 + i * 2 * math.pi / 5
        painter.drawEllipse(centre + QPointF(math.cos(angle), math.sin(angle)) * size * 0.25, size * 0.22, size * 0.22)
    painter.setBrush(QBrush(QColor(CORE)))
    painter.drawEllipse(centre, size * 0.14, size * 0.14)
    if crossed:  # unreachable: a slash a person sees even without colour
        slash = QPen(QColor("#444444"), max(1.5, size / 12))
        slash.setCapStyle(Qt.PenCapStyle.RoundCap)
        painter.setPen(slash)
        painter.drawLine(QPointF(size * 0.15, size * 0.85), QPointF(size * 0.85, size * 0.15))
    painter.end()
    return pixmap


def flower_icon(state: str) -> QIcon:
    """Corolla's five-petal flower at every tray size (crisp on high-DPI panels)."""
    icon = QIcon()
    for size in SIZES:
        icon.addPixmap(_flower(size, PETALS.get(state, PETALS["idle"]), state == "unreachable"))
    return icon


class Tray(QSystemTrayIcon):
    """Menu entries call back into the window; `status_line` is the first, disabled, menu entry."""

    def __init__(
        self,
        parent: QWidget,
        open_window: Callable[[], None],
        open_chat: Callable[[], None],
        toggle_pause: Callable[[bool], None],
        quit_app: Callable[[], None],
        quit_and_stop: Callable[[], None] | None = None,
    ):
        super().__init__(flower_icon("idle"), parent)
        self.state, self.status_line = "idle", "Connecting to the node…"
        self._open_window, self._open_chat, self._toggle_pause, self._quit = (
            open_window,
            open_chat,
            toggle_pause,
            quit_app,
        )
        self._quit_and_stop = quit_and_stop
        self.menu = QMenu(parent)
        self.menu.setObjectName("trayMenu")
        self.menu.aboutToShow.connect(self.rebuild_menu)
        self.setContextMenu(self.menu)
        self.activated.connect(self._activated)
        self.setToolTip("Corolla")
        self.rebuild_menu()

    def _activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            self._open_window()

    def set_state(self, state: str, status_line: str) -> None:
        changed = state != self.state
        self.state, self.status_line = state, status_line
        if changed:
            self.setIcon(flower_icon(state))
        self.setToolTip(f"Corolla — {status_line}")
        if self.menu.isVisible():  # never rebuild an open menu under the user's pointer
            self.menu.actions()[0].setText(status_line)
        else:
            self.rebuild_menu()

    def rebuild_menu(self) -> None:
        self.menu.clear()
        status = QAction(self.status_line, self.menu)
        status.setEnabled(False)
        self.menu.addAction(status)
        self.menu.addSeparator()
        for text, handler in (("Open Corolla", self._open_window), ("Chat", self._open_chat)):
            self.menu.addAction(text).triggered.connect(handler)
        if self.state in ("contributing", "error"):
            self.menu.addAction("Pause contributing").triggered.connect(lambda: self._toggle_pause(True))
        elif self.state in ("paused", "idle"):
            self.menu.addAction("Resume contributing").triggered.connect(lambda: self._toggle_pause(False))
        self.menu.addSeparator()
        self.menu.addAction("Quit…" if self._quit_and_stop is not None else "Quit").triggered.connect(self._quit)
        if self._quit_and_stop is not None and self.state != "unreachable":
            self.menu.addAction("Quit and stop the node").triggered.connect(self._quit_and_stop)
