"""The swarm pane shows the node's verdict on each server (spot checks, issue 17) and checks a server on
purpose, over HTTP, off the UI thread.

No node on this branch produces the `verification` field or `POST /api/swarm/check` yet (the spot
checks are built beside this window), so this test serves that contract from a small real HTTP server
of its own: real sockets, the window's real client, the node API's error envelope. The older-node
side (no field, no endpoint) is tested against a real node in test_gui.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt

from corolla.api.models import SwarmModel, SwarmServer
from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import open_prefs

TOKEN = "contract-token"
LIAR = "12D3KooWLiar000000000000000000000000000000000000"
FRESH = "12D3KooWFresh00000000000000000000000000000000000"
HONEST = "12D3KooWHonest0000000000000000000000000000000000"
OLD = "12D3KooWOldNode000000000000000000000000000000000"
EVIDENCE = {"blocks": "3:6", "step": 21, "max_error": 0.5, "tolerance": 0.004, "compared_with": [HONEST]}


def _server(peer: str, start: int, end: int, verification: dict | None, **extra) -> dict:
    server = {
        "peer_id": peer,
        "state": "ONLINE",
        "start_block": start,
        "end_block": end,
        "throughput": 100.0,
        "ping_ms": 12.0,
        "using_relay": False,
        "this_computer": False,
        "version": "2.2.0",
        "corolla_version": "0.1.0",
        "cache_tokens_left": 4096,
        "public_name": None,
        "torch_dtype": "float32",
        "quant_type": "none",
        **extra,
    }
    if verification is not None:
        server["verification"] = verification
    return server


def _typed(peer: str, start: int, end: int, verification: dict | None, **extra) -> SwarmServer:
    """A server as the window reads it from the node's answer."""
    return SwarmServer.model_validate(_server(peer, start, end, verification, **extra))


SWARM = [
    {
        "dht_prefix": "contract-model",
        "num_blocks": 6,
        "servers": [
            _server("12D3KooWOwn", 0, 6, {"state": "unverified", "checks": 0, "evidence": None}, this_computer=True),
            _server(HONEST, 0, 3, {"state": "verified", "checks": 3, "evidence": None}, public_name="alder"),
            _server(LIAR, 3, 6, {"state": "flagged", "checks": 2, "evidence": EVIDENCE}, public_name="mallory"),
            _server(FRESH, 1, 5, {"state": "unverified", "checks": 0, "evidence": None}, public_name="cedar"),
            _server(OLD, 2, 6, None, public_name="birch"),  # a peer the node has no verdict on
        ],
        "online_per_block": [3, 4, 5, 5, 5, 4],
        "healthy": True,
        "missing_blocks": [],
        "route": [{"peer_id": HONEST, "start": 0, "end": 3}],
    }
]


class ContractNode(BaseHTTPRequestHandler):
    checks: ClassVar[list[dict]] = []

    def _reply(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"kind": "unauthorized", "message": "bad token"})
        if self.path == "/api/swarm":
            return self._reply(200, SWARM)
        return self._reply(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}" or self.path != "/api/swarm/check":
            return self._reply(404, {"detail": "Not Found"})
        self.checks.append(body)
        peer = body.get("peer_id")
        if peer == FRESH:
            return self._reply(
                200,
                {
                    "peer_id": peer,
                    "state": "verified",
                    "detail": "Its output for blocks 1:5 matched this computer's own run within 0.0004.",
                    "max_error": 0.0004,
                    "compared_with": ["this computer"],
                },
            )
        if peer == LIAR:
            return self._reply(
                200,
                {
                    "peer_id": peer,
                    "state": "flagged",
                    "detail": "Its output for blocks 3:6 differs from two other servers by 0.5 (tolerance 0.004).",
                    "max_error": 0.5,
                    "compared_with": [HONEST, FRESH],
                },
            )
        return self._reply(404, {"kind": "not_found", "message": f"no server {peer} in this swarm"})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def contract_node():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ContractNode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_flagged_servers_are_marked_and_a_server_is_checked_on_purpose(qtbot, contract_node):
    from corolla.gui.panes.swarm import SwarmPane
    from corolla.gui.swarm_graph import server_details

    client = NodeClient(contract_node, TOKEN)
    pane = SwarmPane(client, open_prefs(None))
    qtbot.addWidget(pane)
    pane.resize(1000, 700)
    pane.show()
    client.call("GET", "/api/swarm", on_ok=pane.show_swarm, answer=list[SwarmModel])
    qtbot.waitUntil(lambda: pane.table.rowCount() == 5, timeout=10_000)
    graph = pane.map

    # Flagged: marked on the map, named in the summary, the evidence in its details; unverified said so.
    liar = graph.boxes_by_peer[LIAR]
    assert liar.flagged and liar.label.text().startswith("⚠")
    assert "1 server flagged for wrong results" in pane.summary.text()
    details = server_details(liar.server)
    assert "FLAGGED" in details and "largest difference: 0.5" in details and HONEST in details
    assert "Not verified yet" in server_details(graph.boxes_by_peer[FRESH].server)
    assert graph.boxes_by_peer[HONEST].verified and "3 spot checks" in server_details(
        graph.boxes_by_peer[HONEST].server
    )
    trust = {pane.table.servers[r].peer_id: pane.table.data(pane.table.index(r, 2)) for r in range(5)}
    assert trust[LIAR] == "FLAGGED: wrong results" and trust[FRESH] == "not checked yet"
    assert trust[HONEST] == "verified (3 checks)" and trust[OLD] == "–"  # no verdict: nothing claimed
    assert "Not verified" not in server_details(graph.boxes_by_peer[OLD].server)
    assert not pane.peers.isColumnHidden(2)
    pane.grab()  # the hatched, outlined box paints

    # Hovering the flagged box shows its evidence; clicking it pins it (details below the map).
    point = graph.mapFromScene(liar.rect.center())
    qtbot.mouseMove(graph.viewport(), point)
    qtbot.waitUntil(lambda: "largest difference: 0.5" in graph.layer.toolTip(), timeout=5_000)
    qtbot.mouseClick(graph.viewport(), Qt.MouseButton.LeftButton, pos=point)
    assert graph.pinned == LIAR and "FLAGGED" in pane.details.text()

    # Check this server: the request runs in the background; the verdict comes back in the pane.
    checked: list[dict] = []
    pane.checked.connect(checked.append)
    graph.pin(FRESH)
    assert pane.check_button.isEnabled()
    pane.check_button.click()
    assert pane.check_button.text() == "Checking…" and not pane.check_button.isEnabled()
    qtbot.waitUntil(lambda: bool(checked), timeout=10_000)
    assert ContractNode.checks[-1] == {"peer_id": FRESH}
    assert (
        "cedar: ✓ Honest." in pane.check_result.text() and "matched this computer's own run" in pane.check_result.text()
    )
    assert pane.check_button.isEnabled() and pane.check_button.text() == "Chec&k this server"

    checked.clear()
    pane.peers.selectRow(pane.table.row_of(LIAR))  # picked from the table this time
    assert graph.pinned == LIAR
    pane.check_selected()
    qtbot.waitUntil(lambda: bool(checked), timeout=10_000)
    assert "mallory: ⚠ FLAGGED" in pane.check_result.text() and "Largest difference: 0.5" in pane.check_result.text()

    # A peer the node no longer knows: the node's own message, not a crash.
    pane.selected = graph.boxes_by_peer[OLD].server.model_copy(update={"peer_id": "12D3KooWGone"})
    pane.check_selected()
    qtbot.waitUntil(lambda: pane.checking is None, timeout=10_000)
    assert pane.check_result.text() == "Could not check birch: no server 12D3KooWGone in this swarm."


def test_a_slow_server_is_marked_beside_its_verdict():
    from corolla.gui.swarm_graph import server_details, trust_text

    verified = {"state": "verified", "checks": 2, "evidence": None}
    evidence = {"kind": "slow", "times_slower": 12.3, "detail": "slower than it announces: steps take 0.6 s here"}
    slow = _typed(FRESH, 1, 5, verified, speed={"state": "slow", "steps": 9, "step_s": 0.6, "evidence": evidence})
    assert trust_text(slow) == "verified (2 checks) · slow (12x announced)"
    assert "⏱ Slow: slower than it announces" in server_details(slow)
    stalled = {"kind": "stalled", "times_slower": 480.0, "detail": "a step of 1 token had no answer after 3.2 s"}
    staller = _typed(FRESH, 1, 5, None, speed={"state": "slow", "steps": 1, "evidence": stalled})
    assert trust_text(staller) == "stalled (480x announced)"  # slow shows even from a node without verdicts
    measured = _typed(HONEST, 0, 3, verified, speed={"state": "measured", "steps": 30, "step_s": 0.012})
    assert trust_text(measured) == "verified (2 checks)" and "Steps here take 12 ms" in server_details(measured)
    assert trust_text(_typed(OLD, 2, 6, verified)) == "verified (2 checks)"  # an older node: no speed field
