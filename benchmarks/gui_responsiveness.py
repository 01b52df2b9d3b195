"""The window's responsiveness, measured in one run. Prints JSON.

- cold start: a fresh interpreter imports the window, builds it against a real node and paints its
  first frame (target < 1 s; the window never imports torch, and pyqtgraph only on the Stats pane);
- UI-thread stalls (target: none over 50 ms), measured by a 5 ms heartbeat timer on the UI thread (the
  longest gap beyond its interval), against the same heartbeat while the window is idle (baseline):
  * a 1,000-token Markdown reply with headings, lists, a table and code blocks streaming into the chat
    transcript at 200 tokens/s (synthetic tokens: the random-weight demo model writes no Markdown);
  * a real reply streaming from the node (demo model);
  * the swarm map redrawing a synthetic 200-server swarm every 250 ms (servers joining, leaving and
    changing state between updates), with the UI thread's CPU time per redraw (robust to a busy
    machine, where stalls also count the time other processes held the CPU).
- with `--baseline-ref REF`: the map measurement again for the window as it was at git commit REF
  (its app/corolla extracted to a temporary folder), alternating with the current tree's in fresh
  processes against the same node, so before and after come from one run on one machine state.

Usage: QT_QPA_PLATFORM=offscreen python benchmarks/gui_responsiveness.py [--baseline-ref REF]
       (ideally in `unshare -n`)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The node serves the tiny random-weight model: the window's costs do not depend on the weights, and the
# embedded default would be converted (minutes) before anything is measured.
os.environ.setdefault("COROLLA_DEFAULT_MODEL", "tiny")

COLD_START = r"""
import time, sys
t0 = time.perf_counter()
from PySide6.QtWidgets import QApplication
from PySide6.QtCore import QTimer
app = QApplication([])
from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import open_prefs
from corolla.gui.window import MainWindow
window = MainWindow(NodeClient(sys.argv[1], sys.argv[2]), prefs=open_prefs(sys.argv[3]))
window.show()
def painted():
    window.grab()
    print(time.perf_counter() - t0, "torch" in sys.modules, "pyqtgraph" in sys.modules)
    app.exit(0)
QTimer.singleShot(0, painted)
app.exec()
"""
HEARTBEAT_MS = 5


def cold_start(url: str, token: str, prefs: str, runs: int = 3) -> dict:
    times, torch_loaded, charts_loaded = [], False, False
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", COLD_START, url, token, prefs],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        times.append(float(out[0]))
        torch_loaded |= out[1] == "True"
        charts_loaded |= out[2] == "True"
    return {
        "median_s": round(sorted(times)[len(times) // 2], 3),
        "runs": [round(t, 3) for t in times],
        "torch_imported": torch_loaded,
        "pyqtgraph_imported": charts_loaded,
        "target_s": 1.0,
    }


class Heartbeat:
    """A 5 ms timer on the UI thread; the longest gap beyond 5 ms between its ticks is the longest stall."""

    def __init__(self):
        from PySide6.QtCore import QElapsedTimer, QTimer

        self.clock, self.gaps, self.last = QElapsedTimer(), [], 0
        self.timer = QTimer()
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = self.clock.elapsed()
        self.gaps.append(now - self.last - HEARTBEAT_MS)
        self.last = now

    def measure(self, app, seconds: float, until=None) -> float:
        self.gaps.clear()
        self.clock.start()
        self.last = 0
        self.timer.start(HEARTBEAT_MS)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            app.processEvents()
            time.sleep(0.001)
        self.timer.stop()
        return max(self.gaps[3:], default=0)


def markdown_tokens(count: int = 1000) -> list[str]:
    """~1,000 tokens of a Markdown answer: headings, lists, bold, a table and code blocks."""
    section = (
        "## Step {n}\n\nHere is **what happens** in step {n}, with a [link](https://example.org/{n}) "
        "and `inline code`.\n\n"
        "- first point about the swarm\n- second point, *emphasised*\n\n| block | server | ping |\n|---|---|---|\n"
        "| {n} | alder | 12 ms |\n\n```python\ndef step_{n}(x: int) -> int:\n    total = 0\n    for i in range(x):\n"
        "        total += i * {n}\n    return total\n```\n\n"
    )
    text = "".join(section.format(n=n) for n in range(12))
    pieces = [piece + " " for piece in text.split(" ")]
    return (pieces * (count // len(pieces) + 1))[:count]


def markdown_stream(app, window, heartbeat: Heartbeat) -> dict:
    from PySide6.QtCore import QTimer

    chat = window.chat
    window.tabs.setCurrentWidget(chat)
    now = time.time()
    from corolla.gui.turns import Turn

    chat.messages = [
        Turn(id="q", role="user", content="Explain the steps", status="complete", tokens=0, created_at=now),
        Turn(id="a", role="assistant", content="", status="streaming", tokens=0, created_at=now),
    ]
    chat._render()
    chat.pieces, chat.started, chat.reply_text = 0, time.perf_counter(), ""
    tokens = iter(markdown_tokens())
    state = {"done": False}

    def feed() -> None:
        piece = next(tokens, None)
        if piece is None:
            state["done"] = True
            feeder.stop()
            chat._on_event(
                "done", {"text": chat.reply_text, "status": "complete", "tokens": 1000, "tokens_per_second": 200.0}
            )
            return
        chat._on_event("token", {"text": piece})

    feeder = QTimer()
    feeder.timeout.connect(feed)
    feeder.start(5)  # 200 tokens/s
    started = time.perf_counter()
    stall = heartbeat.measure(app, 60, until=lambda: state["done"])
    return {
        "tokens": 1000,
        "seconds": round(time.perf_counter() - started, 2),
        "longest_stall_ms": stall,
        "code_blocks_rendered": len(chat.transcript.code_blocks),
    }


def node_stream(app, window, heartbeat: Heartbeat) -> dict:
    done: list = []
    window.chat.reply_finished.connect(done.append)
    window.chat.chat_id = None
    window.chat.messages = []
    window.chat._render()  # clearing the previous long reply is not part of this reply's streaming
    window.chat.max_tokens.setValue(400)
    window.chat.input.setPlainText("tell me a long story")
    window.chat.send()
    stall = heartbeat.measure(app, 180, until=lambda: bool(done))
    return {"tokens": done[0].tokens if done else 0, "longest_stall_ms": stall}


def synthetic_swarm(n: int, blocks: int, seed: int):
    """A swarm as the window reads it: a SwarmModel, or the JSON for a window from before typed answers
    (a --baseline-ref run)."""
    try:
        from corolla.api.models import SwarmModel
    except ImportError:
        SwarmModel = None

    rng = random.Random(seed)
    servers = []
    for i in range(n):
        start = rng.randrange(0, blocks - 4)
        servers.append(
            {
                "peer_id": f"12D3KooW{seed % 3}{i:040d}",
                "state": rng.choice(["ONLINE"] * 8 + ["JOINING", "OFFLINE"]),
                "start_block": start,
                "end_block": min(blocks, start + rng.randrange(2, 16)),
                "throughput": rng.uniform(50, 3000),
                "ping_ms": rng.uniform(5, 400),
                "using_relay": rng.random() < 0.2,
                "this_computer": i == 0,
                "version": "2.2.0",
                "corolla_version": None if i % 3 else "0.1.0",
                "cache_tokens_left": rng.randrange(0, 100000),
                "public_name": None,
                "torch_dtype": "bfloat16",
                "quant_type": "nf4",
            }
        )
    counts = [
        sum(1 for s in servers if s["start_block"] <= b < s["end_block"] and s["state"] == "ONLINE")
        for b in range(blocks)
    ]
    route, block = [], 0
    for s in sorted(servers, key=lambda s: s["start_block"]):
        if s["start_block"] <= block < s["end_block"] and s["state"] == "ONLINE":
            route.append({"peer_id": s["peer_id"], "start": block, "end": s["end_block"]})
            block = s["end_block"]
    swarm = {
        "dht_prefix": "synthetic-70b",
        "num_blocks": blocks,
        "servers": servers,
        "online_per_block": counts,
        "healthy": min(counts) > 0,
        "missing_blocks": [b for b, c in enumerate(counts) if c == 0],
        "route": route,
    }
    return swarm if SwarmModel is None else SwarmModel.model_validate(swarm)


def map_redraws(app, window, heartbeat: Heartbeat, servers: int = 200) -> dict:
    from PySide6.QtCore import QTimer

    window.tabs.setCurrentWidget(window.swarm)
    idle_started = time.thread_time()
    heartbeat.measure(app, 3.0)
    idle_cpu_per_s = (time.thread_time() - idle_started) / 3.0
    swarms = [synthetic_swarm(servers - (i % 3) * 5, 80, i) for i in range(6)]
    update_ms: list[float] = []
    state = {"i": 0}

    def redraw() -> None:
        started = time.perf_counter()
        window.swarm.show_swarm([swarms[state["i"] % len(swarms)]])  # painting follows as its own event
        update_ms.append((time.perf_counter() - started) * 1000)
        state["i"] += 1

    ticker = QTimer()
    ticker.timeout.connect(redraw)
    ticker.start(250)
    cpu_started = time.thread_time()
    stall = heartbeat.measure(app, 6.0)
    cpu = time.thread_time() - cpu_started - idle_cpu_per_s * 6.0
    ticker.stop()
    return {
        "servers": servers,
        "redraws": len(update_ms),
        "longest_stall_ms": stall,
        "ui_thread_cpu_ms_per_redraw": round(cpu * 1000 / max(len(update_ms), 1), 1),
        "redraw_ms_median": round(sorted(update_ms)[len(update_ms) // 2], 1) if update_ms else None,
        "redraw_ms_max": round(max(update_ms), 1) if update_ms else None,
    }


def map_only(url: str, token: str, prefs: str) -> None:
    """The map measurement alone, in this process, for whichever corolla package is importable."""
    from PySide6.QtWidgets import QApplication

    import corolla
    from corolla.gui.node_client import NodeClient
    from corolla.gui.prefs import open_prefs
    from corolla.gui.window import MainWindow

    app = QApplication.instance() or QApplication([])
    window = MainWindow(NodeClient(url, token), prefs=open_prefs(prefs))
    window.resize(1200, 780)
    window.show()
    heartbeat = Heartbeat()
    heartbeat.measure(app, 3.0)
    result = map_redraws(app, window, heartbeat)
    result["package"] = str(Path(corolla.__file__).parent)
    print(json.dumps(result), flush=True)
    os._exit(0)


def map_before_after(url: str, token: str, tmp: Path, ref: str, rounds: int = 3) -> dict:
    """The map measurement for the window at `ref` and for this tree, alternating in fresh processes."""
    root = Path(__file__).resolve().parents[1]
    baseline = tmp / "baseline"
    baseline.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "app/corolla"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
    trees = {"baseline": baseline / "app", "current": root / "app"}
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    for i in range(rounds):
        for name, app_dir in trees.items():
            env = {**os.environ, "PYTHONPATH": str(app_dir)}
            command = [sys.executable, __file__, "--map-only", url, token, str(tmp / f"{name}-{i}.ini")]
            out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def summary(results: list[dict]) -> dict:
        stalls = sorted(r["longest_stall_ms"] for r in results)
        cpu = sorted(r["ui_thread_cpu_ms_per_redraw"] for r in results)
        return {
            "longest_stall_ms_per_run": [r["longest_stall_ms"] for r in results],
            "longest_stall_ms_median": stalls[len(stalls) // 2],
            "ui_thread_cpu_ms_per_redraw_median": cpu[len(cpu) // 2],
            "package": results[0]["package"],
        }

    return {"ref": ref, "rounds": rounds, "baseline": summary(runs["baseline"]), "current": summary(runs["current"])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-ref", help="also measure the map as it was at this git commit")
    parser.add_argument("--map-only", nargs=3, metavar=("URL", "TOKEN", "PREFS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.map_only:
        map_only(*args.map_only)
        return
    from PySide6.QtWidgets import QApplication

    from corolla.testing.node import NodeProcess

    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProcess(Path(tmp) / "home", name="bench-node")
        try:
            node.wait_contribution("online")
            report = {"cold_start_to_first_paint": cold_start(node.url, node.token, str(Path(tmp) / "cold.ini"))}
            from corolla.gui.node_client import NodeClient
            from corolla.gui.prefs import open_prefs
            from corolla.gui.window import MainWindow

            app = QApplication.instance() or QApplication([])
            window = MainWindow(NodeClient(node.url, node.token), prefs=open_prefs(str(Path(tmp) / "w.ini")))
            window.resize(1200, 780)
            window.show()
            heartbeat = Heartbeat()
            heartbeat.measure(app, 3.0)  # let the first refreshes land
            report["idle_longest_stall_ms"] = heartbeat.measure(app, 3.0)
            report["markdown_reply_1000_tokens"] = markdown_stream(app, window, heartbeat)
            report["node_reply"] = node_stream(app, window, heartbeat)
            report["swarm_map_200_servers"] = map_redraws(app, window, heartbeat)
            report["target_stall_ms"] = 50
            window.quit_app()
            if args.baseline_ref:
                report["swarm_map_before_after"] = map_before_after(node.url, node.token, Path(tmp), args.baseline_ref)
        finally:
            node.stop()
    print(json.dumps(report, indent=2), flush=True)
    os._exit(0)  # skip Qt's teardown at interpreter exit (it can abort after a node's threads are gone)


if __name__ == "__main__":
    main()
