"""The settings dialog's "Swarms on this network" against a real node (pytest-qt, offscreen): the switch
takes effect at once, Save with a private swarm makes it reachable on the LAN, and a node without the
endpoint leaves the invite field working. (Listing and joining a neighbour's swarm: test_lan_discovery.)"""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

pytest.importorskip("PySide6")

from corolla.api.models import NodeStatus
from corolla.gui.node_client import NodeClient
from corolla.gui.settings_dialog import SettingsDialog
from corolla.testing.node import NodeProcess


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # Awaiting consent: no block server, only the API (and discovery once switched on).
    process = NodeProcess(tmp_path_factory.mktemp("lan-gui-node"), extra_env={"COROLLA_AWAIT_CONSENT": "1"})
    yield process
    process.stop()


def test_discovery_switch_applies_at_once_and_save_opens_the_private_swarm_to_the_lan(qtbot, node):
    dialog = SettingsDialog(NodeClient(node.url, node.token))
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: dialog.settings is not None, timeout=20_000)
    assert not dialog.lan_discovery.isChecked() and not dialog.lan_box.isVisible()  # off by default; private
    dialog.invite_option.setChecked(True)
    assert dialog.lan_box.isVisible() and dialog.invite.isVisible()
    qtbot.waitUntil(lambda: "Switch on" in dialog.lan_note.text(), timeout=10_000)
    assert dialog.lan_list.count() == 0 and not dialog.lan_join.isEnabled()

    dialog.lan_discovery.click()  # as a person does: the node starts listening now, not on Save
    qtbot.waitUntil(lambda: node.get("/api/settings").json()["lan_discovery"], timeout=10_000)
    qtbot.waitUntil(lambda: "Looking" in dialog.lan_note.text(), timeout=10_000)
    assert node.get("/api/lan/swarms").json()["enabled"] is True

    dialog.private.setChecked(True)
    with qtbot.waitSignal(dialog.accepted, timeout=20_000):
        dialog.save()
    saved = node.get("/api/settings").json()
    assert saved["lan_discovery"] and saved["listen_on_lan"] and saved["swarm"] == "private"


class _OldNode(http.server.BaseHTTPRequestHandler):
    """A node from before LAN discovery: its settings have no lan_discovery, /api/lan/swarms is unknown."""

    def do_GET(self):
        if self.path == "/api/settings":
            settings = {"swarm": "private", "custom_peers": [], "model": None, "torch_dtype": "auto",
                        "quant_type": "none", "memory_cap_gib": None, "only_when_idle": False,
                        "allow_on_battery": True, "time_window": None, "contribute": True}  # fmt: skip
            self._answer(200, settings)
        else:
            self._answer(404, {"kind": "not_found", "message": "Not Found"})

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_a_node_without_lan_discovery_leaves_the_invite_field_working(qtbot):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OldNode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dialog = SettingsDialog(NodeClient(f"http://127.0.0.1:{server.server_port}", "token"))
        qtbot.addWidget(dialog)
        dialog.show()
        qtbot.waitUntil(lambda: dialog.settings is not None, timeout=10_000)
        dialog.invite_option.setChecked(True)
        qtbot.waitUntil(lambda: "cannot list swarms" in dialog.lan_note.text(), timeout=10_000)
        assert not dialog.lan_timer.isActive() and not dialog.lan_join.isEnabled()
        assert not dialog.lan_discovery.isVisible()  # no switch for a setting the node does not have
        assert dialog.invite.isVisible() and "lan_discovery" not in dialog._changes()
    finally:
        server.shutdown()


def test_the_discovery_switch_is_not_offered_with_the_public_swarm(qtbot, node):
    """The public swarm has nothing on the LAN to find or announce: no switch, and saving it turns
    discovery off (the node also keeps it off there)."""
    before = node.get("/api/settings").json()
    node.put("/api/settings", json={**before, "swarm": "private", "lan_discovery": True}).raise_for_status()
    dialog = SettingsDialog(NodeClient(node.url, node.token))
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: dialog.settings is not None, timeout=20_000)
    assert dialog.lan_discovery.isVisible() and dialog.lan_discovery.isChecked()
    dialog.public.setChecked(True)
    assert not dialog.lan_discovery.isVisible()
    assert dialog._changes()["lan_discovery"] is False
    dialog.custom.setChecked(True)
    assert dialog.lan_discovery.isVisible()  # back where it means something
    dialog.public.setChecked(True)
    with qtbot.waitSignal(dialog.accepted, timeout=20_000):
        dialog.save()
    saved = node.get("/api/settings").json()
    assert saved["swarm"] == "public" and saved["lan_discovery"] is False
    # A node told otherwise (an API client, an old settings file) still neither listens nor announces.
    node.put("/api/settings", json={**saved, "lan_discovery": True}).raise_for_status()
    lan = node.get("/api/lan/swarms").json()
    assert lan["enabled"] is False and lan["swarms"] == [] and "public" in lan["not_announced_because"]
    node.put("/api/settings", json=before).raise_for_status()


def test_joining_a_swarm_takes_its_model(node):
    """An invite (pasted, or a neighbour's LAN announcement) names the swarm's model: joining serves it."""
    from corolla.node.invites import make_invite

    member = socket.socket()  # the inviting member's port answers: joining tries it first
    member.bind(("127.0.0.1", 0))
    member.listen()
    peers = [f"/ip4/127.0.0.1/tcp/{member.getsockname()[1]}/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"]
    before = node.get("/api/settings").json()
    assert before["model"] is None  # the built-in model, as a fresh node has it
    demo_name = node.get("/api/status").json()["model_card"]["name"]
    joined = node.post(
        "/api/settings/join", json={"invite": make_invite(peers, "their-prefix", "their-org/Their-Model")}
    )
    assert joined.status_code == 200, joined.text
    settings = node.get("/api/settings").json()
    assert settings["model"] == "their-org/Their-Model" and settings["dht_prefix"] == "their-prefix"
    assert settings["swarm"] == "custom" and settings["custom_peers"] == peers
    assert settings["swarm_members"][0] == "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"  # "members" privacy
    # The built-in model, named as a neighbour's node announces it: back to the built-in model.
    node.post("/api/settings/join", json={"invite": make_invite(peers, "p", demo_name)}).raise_for_status()
    assert node.get("/api/settings").json()["model"] is None
    # A folder on the neighbour's computer cannot be served from here: a clear error, nothing changed.
    current = node.get("/api/settings").json()
    refused = node.post("/api/settings/join", json={"invite": make_invite(peers, "p", "/home/bob/models/secret")})
    assert refused.status_code == 400 and "copy that folder" in refused.text, refused.text
    assert node.get("/api/settings").json() == current
    member.close()
    node.put("/api/settings", json=before).raise_for_status()


def test_the_private_swarm_choice_says_what_it_means_and_the_pane_says_who_can_join(qtbot, node):
    """Settings: This computer only / Let others join, one sentence each (with the kept port once chosen);
    Save keeps the choice. Contribute: the same choice, what reaches whom, and the fixes."""
    from corolla.gui.panes.contribute import ContributePane

    before = node.get("/api/settings").json()
    fresh = {"swarm": "private", "listen_on_lan": False, "lan_discovery": False}
    node.put("/api/settings", json={**before, **fresh}).raise_for_status()
    dialog = SettingsDialog(NodeClient(node.url, node.token))
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: dialog.settings is not None, timeout=10000)
    assert dialog.sharing_box.isVisible() and dialog.only_here.isChecked()
    assert "nobody else can join" in dialog.sharing_note.text()
    dialog.let_join.setChecked(True)
    assert "Other computers connect to this one on" in dialog.sharing_note.text()
    assert dialog.nat_port_map.isVisible() and not dialog.nat_port_map.isChecked()  # off unless switched on
    dialog.save()
    qtbot.waitUntil(lambda: node.get("/api/settings").json()["listen_on_lan"] is True, timeout=10000)
    assert node.get("/api/settings").json()["nat_port_map"] is False

    status = node.get("/api/status").json()
    sharing = status["sharing"]
    assert sharing["choice"] == "others" and sharing["sentence"].startswith("Let others join")
    pane = ContributePane(NodeClient(node.url, node.token))
    qtbot.addWidget(pane)
    pane.show()
    pane.show_status(NodeStatus.model_validate(status))
    assert pane.invite_box.isVisible() and pane.let_join.isChecked()
    assert pane.share_sentence.text() == sharing["sentence"]
    assert not pane.invite.isVisible()  # no server online yet: no invite to copy
    pane.only_here.click()
    qtbot.waitUntil(lambda: node.get("/api/settings").json()["listen_on_lan"] is False, timeout=10000)
    node.put("/api/settings", json=before).raise_for_status()
