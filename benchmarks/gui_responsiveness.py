"""The window's responsiveness, measured against a real node in the same run. Prints JSON.

- cold start: a fresh interpreter imports the window, builds it and paints its first frame (target < 1 s;
  the window process never imports torch);
- UI stalls: a 5 ms timer runs on the UI thread while a chat reply streams; the longest gap between its
  ticks beyond the 5 ms is the longest stall (target: none over 50 ms). Baseline: the same timer while idle.

Usage: QT_QPA_PLATFORM=offscreen python benchmarks/gui_responsiveness.py   (as root, ideally in `unshare -n`)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLD_START = r"""
import time, sys
t0 = time.perf_counter()
from PySide6.QtWidgets import QApplication
from PySide6.QtCore import QTimer
app = QApplication([])
from corolla.gui.node_client import NodeClient
from corolla.gui.window import MainWindow
window = MainWindow(NodeClient(sys.argv[1], sys.argv[2]))
window.show()
def painted():
    window.grab()
    print(time.perf_counter() - t0, "torch" in sys.modules)
    app.quit()
QTimer.singleShot(0, painted)
app.exec()
"""


def cold_start(url: str, token: str, runs: int = 3) -> dict:
    times, torch_loaded = [], False
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", COLD_START, url, token], capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
        times.append(float(out[0]))
        torch_loaded |= out[1] == "True"
    return {
        "median_s": round(sorted(times)[len(times) // 2], 3),
        "runs": [round(t, 3) for t in times],
        "torch_imported": torch_loaded,
    }


def stalls(node) -> dict:
    from PySide6.QtCore import QElapsedTimer, QTimer
    from PySide6.QtWidgets import QApplication

    from corolla.gui.node_client import NodeClient
    from corolla.gui.window import MainWindow

    app = QApplication.instance() or QApplication([])
    window = MainWindow(NodeClient(node.url, node.token))
    window.show()
    clock, gaps, last = QElapsedTimer(), [], [0]
    clock.start()

    def tick():
        now = clock.elapsed()
        gaps.append(now - last[0] - 5)
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(5)

    def run_for(seconds: float, until=None) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            app.processEvents()
            time.sleep(0.001)

    run_for(3.0)
    idle = max(gaps[10:]) if len(gaps) > 10 else 0
    gaps.clear()
    done = []
    window.chat.reply_finished.connect(done.append)
    window.chat.input.setPlainText("tell me a long story")
    window.chat.max_tokens.setValue(400)
    window.chat.send()
    run_for(120.0, until=lambda: bool(done))
    streaming = max(gaps) if gaps else 0
    timer.stop()
    result = {
        "idle_longest_stall_ms": idle,
        "streaming_longest_stall_ms": streaming,
        "streamed_tokens": done[0]["tokens"] if done else 0,
        "target_ms": 50,
    }
    window.close()
    window.deleteLater()
    app.processEvents()
    return result


def main() -> None:
    from tests.support.node import NodeProcess

    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProcess(Path(tmp) / "home", name="bench-node")
        try:
            node.wait_contribution("online")
            report = {"cold_start_to_first_paint": cold_start(node.url, node.token), "target_cold_start_s": 1.0}
            report["ui_stalls"] = stalls(node)
        finally:
            node.stop()
    print(json.dumps(report, indent=2), flush=True)
    os._exit(0)  # skip Qt's teardown at interpreter exit (it can abort after a node's threads are gone)


if __name__ == "__main__":
    main()
