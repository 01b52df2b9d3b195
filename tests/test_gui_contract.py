"""The window reads every answer of the node as a corolla.api model. A node of another version whose
answers do not fit says so in one line, and the window keeps running (pytest-qt, offscreen; a fake
node on loopback answers in another form)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("PySide6")

from corolla.api.models import NodeStatus, SwarmModel
from corolla.gui.node_client import NodeClient, Unreadable, parse_answer
from corolla.gui.node_settings import NodeSettings
from corolla.gui.prefs import open_prefs
from corolla.gui.window import MainWindow

TOKEN = "other-version"
# A node of another version: its status has no contribution, its swarm's servers no blocks.
ANSWERS = {
    "/api/status": {
        "version": "9.0.0",
        "pid": 1,
        "started_at": 0.0,
        "model": "m",
        "model_is_demo": False,
        "swarm": "p",
    },
    "/api/swarm": [{"dht_prefix": "m", "num_blocks": 2, "servers": [{"peer_id": "p", "state": "ONLINE"}]}],
}


class OtherVersionNode(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = ANSWERS.get(self.path.partition("?")[0], [])
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def other_node():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtherVersionNode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_answer_that_does_not_fit_is_one_sentence():
    with pytest.raises(ValueError) as caught:
        parse_answer(NodeStatus, ANSWERS["/api/status"], "GET /api/status")
    message = str(caught.value)
    assert message.startswith("the node (Corolla 9.0.0) answered GET /api/status in a form this window does not")
    assert "contribution" in message and "\n" not in message and "restart the node" in message
    models = parse_answer(list[SwarmModel], [{"dht_prefix": "m", "num_blocks": 2, "future_field": 1}], "GET")
    assert models[0].servers == [] and not models[0].healthy  # fields a newer node adds are ignored


def test_a_node_of_another_version_gets_one_line_and_no_crash(qtbot, tmp_path, other_node):
    window = MainWindow(NodeClient(other_node, TOKEN), prefs=open_prefs(str(tmp_path / "window.ini")))
    qtbot.addWidget(window)
    for timer in window._timers:
        timer.stop()
    window.show()
    window.refresh_status()
    qtbot.waitUntil(lambda: window.node_banner.isVisibleTo(window), timeout=10_000)
    text = window.node_banner_text.text()
    assert text.startswith("The node (Corolla 9.0.0) answered GET /api/status in a form this window does not read")
    # The status bar says it too (or what another answer of that node, read meanwhile, did not fit).
    assert "read" in window.banner.text() and "\n" not in window.banner.text() and window.status is None

    errors: list[str] = []
    window.client.call(
        "GET", "/api/swarm", on_ok=window.swarm.show_swarm, on_error=errors.append, answer=list[SwarmModel]
    )
    qtbot.waitUntil(lambda: bool(errors), timeout=10_000)
    assert isinstance(errors[0], Unreadable) and "GET /api/swarm" in errors[0] and "servers.0" in errors[0]


def test_settings_keep_a_newer_nodes_fields_and_skip_an_older_nodes():
    newer = NodeSettings.model_validate({"swarm": "public", "custom_peers": [], "cpu_percent": 50, "future": "kept"})
    body = newer.with_changes(contribute=False)
    assert body == {"swarm": "public", "custom_peers": [], "cpu_percent": 50, "future": "kept", "contribute": False}
    assert newer.has("cpu_percent") and not newer.has("lan_discovery") and newer.lan_discovery is False


def test_a_request_that_does_not_fit_is_not_sent_and_says_why_as_the_node_would(qtbot, other_node):
    from corolla.api.models import CheckServer, HfToken

    client = NodeClient(other_node, TOKEN)
    errors: list[str] = []
    assert (
        client.call("PUT", "/api/secrets/hf-token", {"token": "two words"}, on_error=errors.append, request=HfToken)
        is None
    )
    qtbot.waitUntil(lambda: bool(errors), timeout=5_000)
    assert errors[0].startswith("token: String should match pattern")  # the node's own 422 message, field first
    sent = client.call("POST", "/api/swarm/check", {"peer_id": "p"}, on_error=errors.append, request=CheckServer)
    assert sent is not None  # a body that fits goes to the node (this one answers it with an error)
    qtbot.waitUntil(lambda: len(errors) == 2, timeout=5_000)
