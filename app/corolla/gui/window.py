"""The main window: four panes, the node's state on a banner and in the tray, refresh timers, and
what the window remembers (size, pane, splitters)."""

from __future__ import annotations

import time

from PySide6.QtCore import QEventLoop, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QActionGroup, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QFrame,
    QHBoxLayout,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSystemTrayIcon,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from corolla.api import models as m
from corolla.api import routes
from corolla.gui import theme
from corolla.gui.node_client import NodeClient
from corolla.gui.panes import ChatPane, ContributePane, StatsPane, SwarmPane
from corolla.gui.prefs import open_prefs
from corolla.gui.status_text import node_memory, quit_question, status_line
from corolla.gui.tray import Tray, tray_state
from corolla.gui.widgets import plain_label, sentence
from corolla.gui.window_refresh import SWARM_POLL_MS, SWARM_POLL_OTHER_PANES, NodeRefresh

__all__ = ["SWARM_POLL_OTHER_PANES", "MainWindow", "quit_question", "status_line", "tray_state"]
NODE_RESTART_TIMEOUT_S = 90


class MainWindow(NodeRefresh, QMainWindow):
    # The node no longer waits for the user's go-ahead: given in the welcome dialog, by Start, by the
    # chat's "Resume contributing", or the node was never waiting. The welcome dialog is then done with.
    consent_known = Signal()

    def __init__(self, client: NodeClient, prefs: QSettings | None = None, paths=None, parent: QWidget | None = None):
        super().__init__(parent)
        self.client = client
        client.setParent(self)  # in-flight replies die with the window, never calling into deleted views
        self.prefs = prefs if prefs is not None else open_prefs()
        self.paths = paths  # NodePaths of the node to restart (None: the user's default)
        self.quitting = False
        self.status: m.NodeStatus | None = None
        self.reachable = True
        self.tray: Tray | None = None
        self._in_flight: set[str] = set()
        self._swarm_again = False  # the contribution changed while a swarm read was under way: read again
        self._swarm_read_once = False  # a failed read says "yet" before any, "now" after
        self._restart_deadline: float | None = None
        chosen = str(self.prefs.value("window/theme", "system") or "system")
        if chosen != theme.choice():
            theme.set_choice(chosen)
            app = QApplication.instance()
            if app is not None:
                theme.apply(app)
        self.setWindowTitle("Corolla")
        self.setMinimumSize(760, 520)
        if not self.restoreGeometry(self.prefs.value("window/geometry") or b""):
            self.resize(1100, 740)

        central = QWidget()
        column = QVBoxLayout(central)
        column.setContentsMargins(0, 0, 0, 0)
        column.setSpacing(0)
        self.node_banner = QFrame()
        self.node_banner.setObjectName("nodeBanner")
        banner_row = QHBoxLayout(self.node_banner)
        banner_row.setContentsMargins(12, 8, 12, 8)
        self.node_banner_text = plain_label("")
        self.node_banner_text.setWordWrap(True)
        self.restart_button = QPushButton("Restart the node")
        self.restart_button.setAccessibleName("Restart the node")
        self.restart_button.clicked.connect(self.restart_node)
        banner_row.addWidget(self.node_banner_text, 1)
        banner_row.addWidget(self.restart_button)
        self.node_banner.hide()
        column.addWidget(self.node_banner)

        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.contribute = ContributePane(client)
        self.chat = ChatPane(client, self.prefs)
        self.swarm = SwarmPane(client, self.prefs)
        self.stats = StatsPane(client, self.prefs)
        panes = (
            (self.contribute, "Contribute"),
            (self.chat, "Chat"),
            (self.swarm, "Swarm"),
            (self.stats, "Stats"),
        )
        for pane, title in panes:
            self.tabs.addTab(pane, title)
            pane.setAccessibleName(f"{title} pane")
        self.tabs.setCurrentIndex(min(max(int(self.prefs.value("window/pane", 0) or 0), 0), 3))
        self.tabs.currentChanged.connect(self._pane_changed)
        column.addWidget(self.tabs, 1)
        self.setCentralWidget(central)

        # Every shortcut sits in a menu, so the menus are where people find them.
        menu = self.menuBar()
        corolla_menu = menu.addMenu("&Corolla")
        corolla_menu.addAction("&Settings…", QKeySequence("Ctrl+,"), lambda: self.open_settings())
        corolla_menu.addAction("&New chat", QKeySequence("Ctrl+N"), self.new_chat)
        corolla_menu.addAction("&Pause or resume contributing", QKeySequence("Ctrl+P"), self.toggle_pause)
        corolla_menu.addSeparator()
        corolla_menu.addAction("&Close window", QKeySequence("Ctrl+W"), self.close)  # to the tray, if any
        corolla_menu.addAction("&Quit…", QKeySequence("Ctrl+Q"), self.ask_quit)
        corolla_menu.addAction("Quit and stop the &node", lambda: self.quit_app(stop_node=True))
        view_menu = menu.addMenu("&View")
        for index, (_pane, title) in enumerate(panes):
            view_menu.addAction(
                f"&{index + 1} {title}",
                QKeySequence(f"Ctrl+{index + 1}"),
                lambda i=index: self.show_pane(self.tabs.widget(i)),
            )
        view_menu.addSeparator()
        view_menu.addAction("&Refresh", QKeySequence(QKeySequence.StandardKey.Refresh), self.refresh_all)
        view_menu.addSeparator()
        theme_menu = view_menu.addMenu("&Theme")
        self.theme_actions = QActionGroup(self)
        for choice, text in (("system", "&System"), ("light", "&Light"), ("dark", "&Dark")):
            action = theme_menu.addAction(text, lambda c=choice: self.set_theme(c))
            action.setCheckable(True)
            action.setData(choice)
            self.theme_actions.addAction(action)
        self._check_theme_action()
        chat_menu = menu.addMenu("C&hat")
        chat_menu.addAction("&Search chats", QKeySequence(QKeySequence.StandardKey.Find), self._search_chats)
        chat_menu.addAction("&Rename chat…", QKeySequence("F2"), lambda: self.chat.rename_chat())
        # Del and Esc act only inside the chat list and the chat pane (they are the pane's own shortcuts);
        # the menu names them after a tab, which Qt shows as the entry's shortcut.
        chat_menu.addAction("&Delete chat\tDel", lambda: self.chat.delete_chat())
        chat_menu.addAction("Re&generate the last answer", QKeySequence("Ctrl+R"), self.chat.regenerate)
        chat_menu.addAction("S&top the reply\tEsc", self.chat.stop)
        swarm_menu = menu.addMenu("S&warm")
        swarm_menu.addAction("&Fit the map", QKeySequence("Ctrl+0"), lambda: self._on_swarm(self.swarm.map.fit))
        zoom_in = swarm_menu.addAction("Zoom &in", lambda: self._on_swarm(lambda: self.swarm.map.zoom(1.25)))
        zoom_in.setShortcuts([QKeySequence("Ctrl++"), QKeySequence("Ctrl+=")])
        zoom_out = swarm_menu.addAction("Zoom &out", lambda: self._on_swarm(lambda: self.swarm.map.zoom(0.8)))
        zoom_out.setShortcut(QKeySequence("Ctrl+-"))
        swarm_menu.addAction(
            "&Check the selected server", QKeySequence("Ctrl+K"), lambda: self._on_swarm(self.swarm.check_selected)
        )

        self.banner = plain_label("")
        self.statusBar().addWidget(self.banner, 1)
        client.error.connect(lambda message: self.banner.setText(sentence(message)))
        self.contribute.settings_changed.connect(self.refresh_all)
        self.chat.resume_requested.connect(lambda: self.contribute.control("resume"))
        self.chat.reply_finished.connect(lambda _: self.refresh_stats())
        self.swarm.checked.connect(lambda _: self.refresh_swarm())
        self._timers = []
        self._swarm_ticks = 0
        polls = ((1000, self.refresh_status), (SWARM_POLL_MS, self._poll_swarm), (10000, self.refresh_stats))
        for interval, refresh in polls:
            timer = QTimer(self)
            timer.timeout.connect(refresh)
            timer.start(interval)
            self._timers.append(timer)
        self._restart_timer = QTimer(self)
        self._restart_timer.setInterval(500)
        self._restart_timer.timeout.connect(self._look_for_node)
        app = QApplication.instance()
        if app is not None:
            app.styleHints().colorSchemeChanged.connect(self._scheme_changed)
        QTimer.singleShot(0, self.refresh_all)

    # --- the node -----------------------------------------------------------------------------------
    def restart_node(self) -> None:
        """Start `corolla node` again and follow it to its new address and token."""
        from corolla.gui.launcher import start_node

        try:
            start_node(paths=self.paths)
        except OSError as exc:
            self.node_banner_text.setText(sentence(f"Could not start the node: {exc}"))
            return
        self._restart_deadline = time.monotonic() + NODE_RESTART_TIMEOUT_S
        self.restart_button.setEnabled(False)
        self.node_banner_text.setText("Starting the node…")
        self._restart_timer.start()

    def _look_for_node(self) -> None:
        from corolla.gui.launcher import running_node

        found = running_node(self.paths)
        if found is not None:
            self._restart_timer.stop()
            self.client.retarget(*found)
            self.refresh_status()
            return
        if self._restart_deadline is not None and time.monotonic() > self._restart_deadline:
            self._restart_timer.stop()
            self.restart_button.setEnabled(True)
            self.node_banner_text.setText("The node did not start. Run `corolla node` in a terminal to see why.")

    def open_settings(self, first_run: bool = False, on_done=None) -> None:
        from corolla.gui.settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.client, first_run=first_run, parent=self)
        dialog.accepted.connect(self.refresh_all)
        if on_done is not None:
            dialog.accepted.connect(on_done)
        dialog.open()
        self.settings_dialog = dialog

    def new_chat(self) -> None:
        self.show_window(self.chat)
        self.chat.new_chat()

    # --- keyboard -----------------------------------------------------------------------------------
    def show_pane(self, pane: QWidget) -> None:
        """Switch to a pane and put the keyboard where its work starts."""
        self.tabs.setCurrentWidget(pane)
        pane.focus_first()

    def toggle_pause(self) -> None:
        state = self.status.contribution.state if self.status is not None else None
        if state == "paused":
            self.contribute.control("resume")
        elif state in ("online", "starting", "loading", "restarting"):
            self.contribute.control("pause")
        else:
            self.banner.setText("Nothing to pause: this computer is not contributing now.")

    def _search_chats(self) -> None:
        self.tabs.setCurrentWidget(self.chat)
        self.chat.search.setFocus()
        self.chat.search.selectAll()

    def _on_swarm(self, action) -> None:
        self.tabs.setCurrentWidget(self.swarm)
        action()

    # --- tray ---------------------------------------------------------------------------------------
    def install_tray(self) -> bool:
        if not QSystemTrayIcon.isSystemTrayAvailable():
            return False
        self.tray = Tray(
            self,
            open_window=self.show_window,
            open_chat=lambda: self.show_window(self.chat),
            toggle_pause=lambda pause: self.contribute.control("pause" if pause else "resume"),
            quit_app=self.ask_quit,
            quit_and_stop=lambda: self.quit_app(stop_node=True),
        )
        self.tray.show()
        if self.status is not None:
            self._status_shown(self.status)
        return True

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._swarm_ticks:  # shown again from the tray: the swarm was not polled while hidden
            self.refresh_swarm()

    def show_window(self, pane: QWidget | None = None) -> None:
        if pane is not None:
            self.tabs.setCurrentWidget(pane)
        self.show()
        self.setWindowState(self.windowState() & ~Qt.WindowState.WindowMinimized)
        self.raise_()
        self.activateWindow()

    # --- look and memory ----------------------------------------------------------------------------
    def _pane_changed(self, index: int) -> None:
        self.prefs.setValue("window/pane", index)
        if self.tabs.widget(index) is self.stats:
            self.stats.refresh()
        elif self.tabs.widget(index) is self.swarm:
            self.refresh_swarm()  # the map as it is now, not as it was when last polled

    def set_theme(self, choice: str) -> None:
        """System, Light or Dark, at once and remembered (COROLLA_THEME, if set, still wins)."""
        self.prefs.setValue("window/theme", choice)
        theme.set_choice(choice)
        self._check_theme_action()
        self._scheme_changed()

    def _check_theme_action(self) -> None:
        for action in self.theme_actions.actions():
            action.setChecked(action.data() == theme.choice())

    def _scheme_changed(self, *_args) -> None:
        app = QApplication.instance()
        if app is not None:
            theme.apply(app)
        self.chat._render()
        self.swarm.show_swarm(self.swarm.models)
        self.stats.restyle()
        if self.status is not None:
            self.contribute.show_status(self.status)

    def save_state(self) -> None:
        self.prefs.setValue("window/geometry", self.saveGeometry())
        self.prefs.setValue("window/pane", self.tabs.currentIndex())
        self.prefs.setValue("chat/splitter", self.chat.splitter.saveState())
        self.prefs.setValue("swarm/splitter", self.swarm.splitter.saveState())
        self.prefs.sync()

    def closeEvent(self, event) -> None:
        # Closing the window never stops the node; with a tray, the app stays there.
        self.save_state()
        if not self.quitting and self.tray is not None and self.tray.isVisible():
            event.ignore()
            self.hide()
            return
        self.chat.commit_delete()
        event.accept()

    def ask_quit(self) -> None:
        """Quit, asking first (as BOINC's Exit does) whether the node should stop too: it is its own
        process and, left running, keeps contributing and holds the model in memory. The answer can be
        remembered; "Quit and stop the node" in the menus is always there."""
        remembered = str(self.prefs.value("quit/node", "") or "")
        if not self.reachable or remembered in ("keep", "stop"):
            self.quit_app(stop_node=self.reachable and remembered == "stop")
            return
        box = QMessageBox(self)
        box.setWindowTitle("Quit Corolla")
        box.setIcon(QMessageBox.Icon.Question)
        box.setText("Stop the node too?")
        box.setInformativeText(quit_question(self.status, node_memory(self.paths)))
        stop = box.addButton("Stop the node and quit", QMessageBox.ButtonRole.AcceptRole)
        keep = box.addButton("Keep it running and quit", QMessageBox.ButtonRole.AcceptRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(keep)
        remember = QCheckBox("Remember my choice (the Corolla menu has both ways to quit)")
        box.setCheckBox(remember)
        self.quit_box = box
        box.exec()
        chosen = box.clickedButton()
        if chosen not in (stop, keep):
            return
        if remember.isChecked():
            self.prefs.setValue("quit/node", "stop" if chosen is stop else "keep")
        self.quit_app(stop_node=chosen is stop)

    def quit_app(self, stop_node: bool = False) -> None:
        """Quit the window and the tray; the node keeps running (it is its own process) unless
        `stop_node`. Qt 6 asks every window to close first, so the close handler must know this is a
        quit, not a hide."""
        self.quitting = True
        if stop_node and self.reachable:
            shutdown = self.client.call("POST", routes.SHUTDOWN, on_error=lambda _: None, timeout_ms=5000)
            loop = QEventLoop()
            shutdown.finished.connect(loop.quit)
            QTimer.singleShot(5000, loop.quit)
            if not shutdown.isFinished():
                loop.exec()
        self.save_state()
        deleting = self.chat.commit_delete()
        if deleting is not None and not deleting.isFinished():  # a chat in its undo time: delete it now
            loop = QEventLoop()
            deleting.finished.connect(loop.quit)
            QTimer.singleShot(3000, loop.quit)
            loop.exec()
        if self.chat.stream is not None:
            self.chat.stream.abort()
        for timer in (*self._timers, self._restart_timer):
            timer.stop()
        if self.tray is not None:
            self.tray.hide()
        self.close()
        QApplication.exit(0)
