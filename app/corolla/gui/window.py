"""The main window, its refresh timers and the tray icon."""

from __future__ import annotations

from PySide6.QtCore import QTimer
from PySide6.QtGui import QAction, QColor, QIcon, QPainter, QPixmap
from PySide6.QtWidgets import QLabel, QMainWindow, QMenu, QSystemTrayIcon, QTabWidget, QWidget

from corolla.gui.node_client import NodeClient
from corolla.gui.panes import ChatPane, ContributePane, StatsPane, SwarmPane

TRAY_COLOURS = {"contributing": "#3fa66b", "paused": "#e0a526", "error": "#c0392b", "idle": "#8a8a8a"}


def dot_icon(colour: str) -> QIcon:
    pixmap = QPixmap(32, 32)
    pixmap.fill(QColor(0, 0, 0, 0))
    painter = QPainter(pixmap)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setBrush(QColor(colour))
    painter.setPen(QColor("#ffffff"))
    painter.drawEllipse(3, 3, 26, 26)
    painter.end()
    return QIcon(pixmap)


def tray_state(contribution_state: str) -> str:
    if contribution_state in ("online", "starting", "loading"):
        return "contributing"
    if contribution_state == "paused":
        return "paused"
    if contribution_state in ("restarting", "failed"):
        return "error"
    return "idle"


class MainWindow(QMainWindow):
    def __init__(self, client: NodeClient, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        client.setParent(self)  # in-flight replies die with the window, never calling into deleted views
        self.setWindowTitle("Corolla")
        self.resize(1000, 700)
        self.tabs = QTabWidget()
        self.contribute = ContributePane(client)
        self.chat = ChatPane(client)
        self.swarm = SwarmPane(client)
        self.stats = StatsPane(client)
        for pane, title in (
            (self.contribute, "Contribute"),
            (self.chat, "Chat"),
            (self.swarm, "Swarm"),
            (self.stats, "Stats"),
        ):
            self.tabs.addTab(pane, title)
        self.setCentralWidget(self.tabs)
        settings = self.menuBar().addAction("Settings…")
        settings.triggered.connect(lambda: self.open_settings())
        self.banner = QLabel("")
        self.statusBar().addWidget(self.banner, 1)
        client.error.connect(lambda message: self.banner.setText(message))
        self.tray: QSystemTrayIcon | None = None
        self.tray_state = "idle"
        self._timers = []
        for interval, refresh in ((1000, self.refresh_status), (5000, self.refresh_swarm), (10000, self.refresh_stats)):
            timer = QTimer(self)
            timer.timeout.connect(refresh)
            timer.start(interval)
            self._timers.append(timer)
        self.chat.reply_finished.connect(lambda _: self.refresh_stats())
        QTimer.singleShot(0, self.refresh_all)

    def refresh_all(self) -> None:
        self.refresh_status()
        self.refresh_swarm()
        self.refresh_stats()
        self.chat.refresh_chats()
        self.client.call(
            "GET",
            "/api/hardware",
            on_ok=self.contribute.show_hardware,
            on_error=lambda e: self.contribute.hardware.setText(f"Not available: {e}"),
        )

    def refresh_status(self) -> None:
        def shown(status):
            self.contribute.show_status(status)
            self.banner.setText(f"{status['model']} · {status['swarm']} swarm · secrets: {status['secrets_storage']}")
            self._update_tray(status["contribution"])

        self.client.call(
            "GET", "/api/status", on_ok=shown, on_error=lambda e: self.banner.setText(f"The node does not answer: {e}")
        )

    def refresh_swarm(self) -> None:
        self.client.call("GET", "/api/swarm", on_ok=self.swarm.show_swarm, on_error=self.swarm.show_error)

    def refresh_stats(self) -> None:
        self.client.call("GET", "/api/stats/history?hours=48", on_ok=self.stats.show_history)

    def open_settings(self, first_run: bool = False) -> None:
        from corolla.gui.settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.client, first_run=first_run, parent=self)
        dialog.accepted.connect(self.refresh_all)
        dialog.open()
        self.settings_dialog = dialog

    # --- tray ----------------------------------------------------------------------------------
    def install_tray(self) -> bool:
        if not QSystemTrayIcon.isSystemTrayAvailable():
            return False
        self.tray = QSystemTrayIcon(dot_icon(TRAY_COLOURS["idle"]), self)
        self.tray.setToolTip("Corolla")
        menu = QMenu()
        menu.aboutToShow.connect(lambda: self._build_menu(menu))
        self.tray.setContextMenu(menu)
        self.tray.activated.connect(lambda reason: self.show_window())
        self.tray.show()
        return True

    def _build_menu(self, menu: QMenu) -> None:
        menu.clear()
        for text, handler in (("Open Corolla", self.show_window), ("Chat", lambda: self.show_window(self.chat))):
            action = QAction(text, menu)
            action.triggered.connect(handler)
            menu.addAction(action)
        paused = self.tray_state == "paused"
        toggle = QAction("Resume contributing" if paused else "Pause contributing", menu)
        toggle.triggered.connect(lambda: self.contribute.control("resume" if paused else "pause"))
        menu.addAction(toggle)
        menu.addSeparator()
        quit_action = QAction("Quit (the node keeps contributing)", menu)
        quit_action.triggered.connect(self._quit)
        menu.addAction(quit_action)

    def _update_tray(self, contribution: dict) -> None:
        state = tray_state(contribution["state"])
        if state == self.tray_state:
            return
        was = self.tray_state
        self.tray_state = state
        if self.tray is not None:
            self.tray.setIcon(dot_icon(TRAY_COLOURS[state]))
            self.tray.setToolTip(f"Corolla: {state}")
            if state == "error" and was == "contributing":
                self.tray.showMessage(
                    "Corolla stopped contributing", contribution["reason"], QSystemTrayIcon.MessageIcon.Warning
                )

    def show_window(self, pane: QWidget | None = None) -> None:
        if pane is not None:
            self.tabs.setCurrentWidget(pane)
        self.show()
        self.raise_()
        self.activateWindow()

    def closeEvent(self, event) -> None:
        # Closing the window never stops the node; with a tray, the app stays there.
        if self.tray is not None and self.tray.isVisible():
            event.ignore()
            self.hide()
        else:
            event.accept()

    def _quit(self) -> None:
        from PySide6.QtWidgets import QApplication

        QApplication.quit()
