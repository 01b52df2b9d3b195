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
from corolla.gui import theme
from corolla.gui.node_client import NodeClient, Unreadable
from corolla.gui.node_settings import NodeSettings
from corolla.gui.panes import ChatPane, ContributePane, StatsPane, SwarmPane
from corolla.gui.prefs import open_prefs
from corolla.gui.status_text import node_memory, quit_question, status_line
from corolla.gui.tray import Tray, tray_state
from corolla.gui.widgets import plain_label, route_text, sentence

__all__ = ["MainWindow", "tray_state"]
NODE_RESTART_TIMEOUT_S = 90
# The swarm read is a DHT read and a route on the node: every 5 s only while someone looks at the map;
# with another pane shown, every 30 s (the chat's model list and route); nothing while the window is hidden.
SWARM_POLL_MS = 5000
SWARM_POLL_OTHER_PANES = 6


class MainWindow(QMainWindow):
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

    # --- refreshes ----------------------------------------------------------------------------------
    def _once(
        self, key: str, method: str, path: str, on_ok, on_error=None, timeout_ms: int = 10_000, answer=None
    ) -> None:
        """One request of a kind at a time: a slow node is not buried under polls."""
        if key in self._in_flight:
            return
        self._in_flight.add(key)

        def ok(payload):
            self._in_flight.discard(key)
            on_ok(payload)

        def failed(message):
            self._in_flight.discard(key)
            if on_error is not None:
                on_error(message)

        self.client.call(method, path, on_ok=ok, on_error=failed, timeout_ms=timeout_ms, answer=answer)

    def refresh_all(self) -> None:
        self.refresh_status()
        self.refresh_swarm()
        self.refresh_stats()
        self.chat.refresh_chats()
        self._once(
            "settings",
            "GET",
            "/api/settings",
            lambda s: self.chat.set_default_privacy(s.default_privacy if s.has("default_privacy") else None),
            self._say_unreadable,
            answer=NodeSettings,
        )
        self.client.call(
            "GET",
            "/api/hardware",
            on_ok=self.contribute.show_hardware,
            on_error=lambda e: self.contribute.hardware.setText(sentence(f"Not available: {e}")),
            answer=m.HardwareReport,
        )

    def _say_unreadable(self, message: str) -> None:
        """A poll whose failures are otherwise quiet still says when the node answers in another form."""
        if isinstance(message, Unreadable):
            self.banner.setText(sentence(message))

    def refresh_status(self) -> None:
        self._once(
            "status", "GET", "/api/status", self._status_shown, self._node_unreachable, 5000, answer=m.NodeStatus
        )

    def _status_shown(self, status: m.NodeStatus) -> None:
        was_unreachable = not self.reachable
        self.status, self.reachable = status, True
        self.node_banner.hide()
        self._restart_timer.stop()
        self.contribute.show_status(status)
        self.chat.status_changed(status)
        self.stats.show_lifetime(status.lifetime)
        if self.contribute.hardware_report is None and status.contribution.state == "online":
            self._once(
                "hardware", "GET", "/api/hardware", self.contribute.show_hardware, None, 60_000, m.HardwareReport
            )
        if not status.awaiting_consent:
            self.consent_known.emit()
        c = status.contribution
        self.banner.setText(f"{status.model} · {status.swarm} swarm · secrets: {status.secrets_storage}")
        if self.tray is not None:
            state = "idle" if status.awaiting_consent else tray_state(c.state)
            was = self.tray.state
            self.tray.set_state(state, status_line(status))
            if state == "error" and was == "contributing" and self.tray.supportsMessages():
                self.tray.showMessage("Corolla stopped contributing", c.reason, QSystemTrayIcon.MessageIcon.Warning)
        if was_unreachable:
            self.chat.node_back()
            self.refresh_all()

    def _node_unreachable(self, message: str) -> None:
        was_reachable = self.reachable
        self.status, self.reachable = None, False
        self.chat.status_changed(None)
        restarting = self._restart_timer.isActive()
        if isinstance(message, Unreadable):  # it answers, in a form of another version: say so, in one line
            self.node_banner_text.setText(sentence(message))
        else:
            self.node_banner_text.setText(
                "Starting the node…"
                if restarting
                else "The node is not running: nothing is contributed and chat is unavailable."
            )
        # The technical reason (e.g. "Connection refused") is for whoever asks, on hover.
        self.node_banner_text.setToolTip(sentence(message.removeprefix("the node does not answer ").strip("()")))
        self.restart_button.setEnabled(not restarting)
        self.node_banner.show()
        unreadable = isinstance(message, Unreadable)
        self.banner.setText("The node's answers cannot be read." if unreadable else "The node does not answer.")
        self.contribute.show_unreachable()
        if was_reachable:  # once, when it goes: the panes stop showing what the node last said
            self.swarm.show_unreachable()
            self.chat.show_unreachable()
        if self.tray is not None:
            self.tray.set_state("unreachable", status_line(None))

    def refresh_swarm(self) -> None:
        if not self.reachable:
            return

        def shown(models: list[m.SwarmModel]) -> None:
            # The node says which prefix its model has (None until it knows: no swarm read yet).
            own = self.status.dht_prefix if self.status is not None else None
            prefix = next((x.dht_prefix for x in models if x.dht_prefix == own), None)
            self.swarm.own_prefix = prefix
            self.swarm.show_swarm(models)
            self.chat.show_models(models, prefix)
            model = next((x for x in models if x.dht_prefix == prefix), models[0] if models else None)
            self.chat.route_text = route_text(model.route if model is not None else [])

        def failed(message: str) -> None:
            self.swarm.show_error(message)
            if not self.chat.model_picker.itemData(0):  # nothing known yet: say why the list is empty
                self.chat.show_unreachable("The swarm cannot be read yet")

        self._once("swarm", "GET", "/api/swarm", shown, failed, timeout_ms=90_000, answer=list[m.SwarmModel])

    def _poll_swarm(self) -> None:
        self._swarm_ticks += 1
        if not self.isVisible():
            return
        looked_at = self.tabs.currentWidget() is self.swarm
        unknown = not self.chat.model_picker.itemData(0)  # the chat has no model list yet
        if looked_at or unknown or self._swarm_ticks % SWARM_POLL_OTHER_PANES == 0:
            self.refresh_swarm()

    def refresh_stats(self) -> None:
        if self.reachable:
            path = f"/api/stats/history?hours={self.stats.hours}"
            self._once("stats", "GET", path, self.stats.show_history, self._say_unreadable, answer=list[m.HourStats])

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
            shutdown = self.client.call("POST", "/api/shutdown", on_error=lambda _: None, timeout_ms=5000)
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
