"""`corolla app`: the window and tray. One instance per user; it finds or starts the node.

On the first run the node is started holding back: nothing is served for the swarm until the user
agrees in the welcome dialog."""

from __future__ import annotations

import getpass
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtNetwork import QLocalServer, QLocalSocket
from PySide6.QtWidgets import QApplication, QLabel

from corolla.gui import theme
from corolla.gui.launcher import running_node, start_node
from corolla.gui.node_client import NodeClient
from corolla.gui.window import MainWindow
from corolla.node.paths import NodePaths

NODE_START_TIMEOUT_S = 120
FIRST_RUN_MARKER = "app-first-run-done"


def _instance_name(paths: NodePaths) -> str:
    """One window per node: per user and per node home (a portable or second COROLLA_HOME is another
    node, whose app must not hand itself over to this one's)."""
    home = hashlib.sha256(str(paths.config_dir.resolve()).encode()).hexdigest()[:12]
    return f"corolla-app-{getpass.getuser()}-{home}"


def _focus_existing(name: str) -> bool:
    socket = QLocalSocket()
    socket.connectToServer(name)
    if socket.waitForConnected(300):
        socket.write(b"show")
        socket.waitForBytesWritten(300)
        return True
    return False


def _icon_file() -> Path:
    """resources/icons/corolla.png: beside the bundle's files when frozen, else in the source tree."""
    base = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parents[3]))
    return base / "resources" / "icons" / "corolla.png"


def main(argv: list[str] | None = None) -> int:
    app = QApplication(argv if argv is not None else sys.argv)
    app.setApplicationName("Corolla")
    app.setDesktopFileName("corolla")  # Wayland/X11 match the window to corolla.desktop's icon
    theme.apply(app)
    icon = _icon_file()
    if icon.exists():
        app.setWindowIcon(QIcon(str(icon)))
    paths = NodePaths.default()
    instance = _instance_name(paths)
    if _focus_existing(instance):
        return 0
    QLocalServer.removeServer(instance)
    server = QLocalServer()
    server.listen(instance)
    marker = paths.config_dir / FIRST_RUN_MARKER
    first_run = not marker.exists()
    splash = QLabel("Starting Corolla's node…")
    splash.setMinimumSize(360, 80)
    splash.show()
    state = {"window": None, "started": time.monotonic(), "spawned": False}

    def agreed() -> None:
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("1")

    def open_window(url: str, token: str) -> None:
        client = NodeClient(url, token)
        window = MainWindow(client, paths=paths)
        has_tray = window.install_tray()
        app.setQuitOnLastWindowClosed(not has_tray)
        server.newConnection.connect(lambda: (server.nextPendingConnection(), window.show_window()))
        window.show()
        splash.close()
        if first_run:
            window.open_settings(first_run=True, on_done=agreed)  # the marker only once the user agreed
            window.consent_known.connect(agreed)  # ... in the dialog or another way (Start, the chat's link)
        state["window"] = window
        if os.environ.get("COROLLA_APP_EXIT_AFTER_PAINT"):  # packaging/report.py times the cold start
            QTimer.singleShot(0, lambda: (window.grab(), print("corolla: first paint", flush=True), app.exit(0)))

    def poll() -> None:
        found = running_node(paths)
        if found is not None:
            timer.stop()
            open_window(*found)
            return
        if not state["spawned"]:
            start_node(await_consent=first_run, paths=paths)
            state["spawned"] = True
        if time.monotonic() - state["started"] > NODE_START_TIMEOUT_S:
            timer.stop()
            splash.setText("The node did not start. Run `corolla node` in a terminal to see why.")

    def leave(signum: int, _frame) -> None:
        """SIGTERM or Ctrl+C: quit as the tray's Quit does (a handler that raised, as the CLI's does,
        would be swallowed by the Qt slot it interrupts, and the app would live on)."""
        window = state.get("window")
        if window is not None:
            window.quit_app()
        app.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, leave)
    # Python runs signal handlers only when it gets control: a short timer gives it control even while
    # nothing else calls into Python.
    wake = QTimer()
    wake.timeout.connect(lambda: None)
    wake.start(250)
    timer = QTimer()
    timer.timeout.connect(poll)
    timer.start(300)
    QTimer.singleShot(0, poll)
    code = app.exec()
    wake.stop()
    # Tear the window and tray down while Qt and Python are both alive (an interpreter exit with live
    # Qt objects holding Python callbacks is what ended in "Fatal Python error: none_dealloc").
    timer.stop()
    window = state.pop("window", None)
    if window is not None:
        if window.tray is not None:
            window.tray.hide()
            window.tray.deleteLater()
        window.deleteLater()
    server.close()
    app.processEvents()
    return code


if __name__ == "__main__":
    sys.exit(main())
