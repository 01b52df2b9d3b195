"""Open the window against a running node, visit each pane, save a screenshot of each.

Usage: python scripts/screenshots.py URL TOKEN OUT_DIR   (run by scripts/screenshots.sh under Xvfb)
"""

import sys
import time
from pathlib import Path

from PySide6.QtWidgets import QApplication

from corolla.gui.node_client import NodeClient
from corolla.gui.window import MainWindow


def main() -> None:
    url, token, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication(sys.argv[:1])
    window = MainWindow(NodeClient(url, token))
    window.resize(1100, 720)
    window.show()

    def wait(seconds, until=None):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            app.processEvents()
            time.sleep(0.01)

    wait(
        60,
        lambda: window.contribute.state.text() == "Contributing" and "recommended" in window.contribute.hardware.text(),
    )
    wait(1)
    window.grab().save(str(out / "contribute.png"))
    window.tabs.setCurrentWidget(window.chat)
    done = []
    window.chat.reply_finished.connect(done.append)
    window.chat.input.setPlainText("Hello, swarm! What can you do?")
    window.chat.send()
    wait(60, lambda: bool(done))
    wait(0.5)
    window.grab().save(str(out / "chat.png"))
    window.tabs.setCurrentWidget(window.swarm)
    window.refresh_swarm()
    wait(20, lambda: window.swarm.map.model is not None)
    wait(0.5)
    window.grab().save(str(out / "swarm.png"))
    window.tabs.setCurrentWidget(window.stats)
    window.refresh_stats()
    wait(20, lambda: bool(window.stats.history))
    wait(0.5)
    window.grab().save(str(out / "stats.png"))
    print("saved", sorted(p.name for p in out.glob("*.png")))


if __name__ == "__main__":
    main()
