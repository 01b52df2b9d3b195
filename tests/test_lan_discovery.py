"""Swarms on this network: mDNS announcements between two computers of one lab home (multicast on the
home's LAN bridge), bounded decoding of hostile records, and a node that stays silent until the user
switches discovery on. The probes run in the hosts' namespaces (tests/support/lan_probe.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corolla.node.invites import parse_invite
from corolla.node.lan_discovery import MAX_SWARMS, decode_announcement, encode_announcement
from corolla.testing.lab_swarm import LabNode
from corolla.testing.netlab import NetLab, lab_unavailable_reason

PROBE = str(Path(__file__).parent / "support" / "lan_probe.py")
GUI_JOIN = str(Path(__file__).parent / "support" / "lan_gui_join.py")
PEER = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"


@pytest.fixture(scope="module")
def lab():
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NetLab() as lab:
        alice = lab.add_home("alice")
        lab.add_home_host(alice.home, "bob")
        yield lab


def start_probe(lab: NetLab, host, *args: str) -> subprocess.Popen:
    """A probe that prints a first line once it is ready ("announced", "listening")."""
    process = lab.popen(host, [sys.executable, PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    if not first.strip():
        process.kill()
        pytest.fail(f"probe {args[0]} did not start: {process.stderr.read()[-3000:]}")
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()


def browse(lab: NetLab, host, seconds: float) -> list[dict]:
    result = lab.run(host, [sys.executable, PROBE, "browse", str(seconds)], timeout=seconds + 30)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def raw_counts(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_swarm_announced_on_one_computer_is_listed_on_another(lab):
    alice, bob = lab.hosts["alice"], lab.hosts["bob"]
    listener = start_probe(lab, bob, "raw-listen", "8")
    maddrs = [f"/ip4/{alice.ip}/tcp/4000/p2p/{PEER}", f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER}"]
    announcer = start_probe(lab, alice, "announce", "Alice's PC", "tiny-llama", "tiny-prefix", *maddrs)
    try:
        found = browse(lab, bob, 3)
        cli = lab.run(bob, [sys.executable, "-m", "corolla.cli", "swarm", "lan"], timeout=60)
    finally:
        stop(announcer)
    assert cli.returncode == 0 and "Alice's PC: tiny-llama (1 address(es))" in cli.stdout, cli.stdout + cli.stderr
    assert found[0]["invite"] in cli.stdout
    assert len(found) == 1, found
    swarm = found[0]
    assert (swarm["name"], swarm["model"], swarm["dht_prefix"]) == ("Alice's PC", "tiny-llama", "tiny-prefix")
    assert swarm["peers"] == maddrs[:1]  # its loopback address is not announced: no neighbour can dial it
    invite = parse_invite(swarm["invite"])
    assert (invite.peers, invite.dht_prefix, invite.model) == (maddrs[:1], "tiny-prefix", "tiny-llama")
    # The raw listener heard it too: the control for the silence test below (this LAN carries mDNS).
    assert raw_counts(listener)["corolla"] > 0


def test_hostile_neighbour_cannot_flood_or_inject_malformed_swarms(lab):
    """Seven malformed records (no version, a UDP address, a loopback peer, oversized fields, 40 extra
    keys, a 2.5 KB record, invalid UTF-8) are dropped; of 40 valid ones at most MAX_SWARMS are kept."""
    alice, bob = lab.hosts["alice"], lab.hosts["bob"]
    hostile = start_probe(lab, alice, "hostile", "40", alice.ip)
    try:
        found = browse(lab, bob, 6)
    finally:
        stop(hostile)
    names = [swarm["name"] for swarm in found]
    assert all(name.startswith("flood ") for name in names), names
    assert len(found) == MAX_SWARMS  # full: the rest is dropped unresolved


def test_decoding_is_bounded_and_never_raises():
    maddr = f"/ip4/192.168.1.10/tcp/4000/p2p/{PEER}"
    good = {k.encode(): v.encode() for k, v in encode_announcement("PC", "m", "p", [maddr]).items()}
    assert decode_announcement(good, 200).peers == (maddr,)
    assert decode_announcement(good, 5000) is None  # the whole record is too large
    assert decode_announcement({**good, b"name": b"n" * 65}, 300) is None
    assert decode_announcement({**good, b"p0": b"/ip4/10.0.0.1/tcp/1"}, 200) is None
    assert decode_announcement({**good, b"p0": b"\xff"}, 200) is None
    assert decode_announcement({**good, b"model": None}, 200) is None
    assert decode_announcement({**good, b"model": b"tiny\x1b[2J"}, 200) is None  # a terminal escape
    assert decode_announcement({**good, **{f"k{i}".encode(): b"" for i in range(20)}}, 300) is None
    with pytest.raises(ValueError):
        encode_announcement("PC", "m", "p", [f"/ip4/127.0.0.1/tcp/4000/p2p/{PEER}"])  # nothing dialable


def wait_for(condition, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    return condition()


def test_node_is_silent_until_discovery_is_on_then_lists_and_joins_a_neighbours_swarm(lab, tmp_path):
    alice, bob = lab.hosts["alice"], lab.hosts["bob"]
    # Awaiting the first-run consent: no block server starts, the node only runs its API and discovery.
    node = LabNode(lab, alice, tmp_path / "node-alice", extra_env={"COROLLA_AWAIT_CONSENT": "1"})
    try:
        assert node.request("GET", "/api/settings")["lan_discovery"] is False  # off by default
        listener = start_probe(lab, bob, "raw-listen", "6")
        assert raw_counts(listener)["corolla"] == 0  # off: no query, no announcement on the LAN
        off = node.request("GET", "/api/lan/swarms")
        assert off["enabled"] is False and off["swarms"] == [] and off["announcing"] is False

        maddrs = [f"/ip4/{bob.ip}/tcp/4100/p2p/{PEER}"]
        # Bob's swarm port answers (joining dials an invite's addresses before it changes anything).
        listening = "import socket,time\ns=socket.socket(); s.bind(('0.0.0.0',4100)); s.listen(); time.sleep(600)"
        lab.popen(bob, [sys.executable, "-c", listening])
        announcer = start_probe(lab, bob, "announce", "Bob's laptop", "tiny-llama", "bob-prefix", *maddrs)
        try:
            settings = node.request("GET", "/api/settings")
            node.request("PUT", "/api/settings", {**settings, "lan_discovery": True})
            listed = wait_for(lambda: node.request("GET", "/api/lan/swarms")["swarms"], 30)
            assert [s["name"] for s in listed] == ["Bob's laptop"], listed
            status = node.request("GET", "/api/lan/swarms")
            assert status["enabled"] is True and status["announcing"] is False
            assert "private swarm" in status["not_announced_because"]  # this node's swarm is not on the LAN
            # The window in alice, against its node: the list shows Bob's swarm, one click joins it.
            gui = lab.run(alice, [sys.executable, GUI_JOIN, node.url, node.token], timeout=120)
        finally:
            stop(announcer)
        assert gui.returncode == 0, gui.stderr[-3000:]
        report = json.loads(gui.stdout.strip().splitlines()[-1])
        assert report["settings_loaded"] and report["discovery_checkbox"] and report["list_visible"], report
        assert report["items"] == ["Bob's laptop — tiny-llama"] and not report["join_enabled_before_choice"]
        assert report["accepted"] and not report["error"], report
        joined = node.request("GET", "/api/settings")
        assert joined["swarm"] == "custom" and joined["custom_peers"] == maddrs
        assert joined["dht_prefix"] == "bob-prefix" and joined["model"] == "tiny-llama"  # the swarm's model too
    finally:
        node.stop()


@pytest.mark.slow
def test_node_announces_its_private_swarm_only_while_discovery_is_on(lab, tmp_path, tiny_models):
    """A node serving a private swarm on the LAN: silent with discovery off (a listener on the LAN hears
    nothing), announced with it on (a neighbour lists it with the node's LAN address), gone once off."""
    alice, bob = lab.hosts["alice"], lab.hosts["bob"]
    node = LabNode(lab, alice, tmp_path / "node-alice", extra_env={"COROLLA_AWAIT_CONSENT": "1"})
    try:
        settings = node.request("GET", "/api/settings")
        settings.update(model=str(tiny_models.get("llama")), torch_dtype="float32", listen_on_lan=True)
        settings.update(public_name="Alice's desktop", dht_prefix="tiny-lan", lan_discovery=False)
        node.request("PUT", "/api/settings", settings)
        node.request("POST", "/api/contribution/start")
        online = wait_for(lambda: node.request("GET", "/api/status")["contribution"]["state"] == "online", 120)
        assert online, node.log_path.read_text()[-3000:]
        assert node.request("GET", "/api/status")["invite"]  # a private swarm a neighbour could join by hand

        listener = start_probe(lab, bob, "raw-listen", "6")
        assert raw_counts(listener)["corolla"] == 0  # off: the swarm is not announced

        node.request("PUT", "/api/settings", {**settings, "lan_discovery": True})
        assert wait_for(lambda: node.request("GET", "/api/lan/swarms")["announcing"], 30)
        found = browse(lab, bob, 3)
        assert [s["name"] for s in found] == ["Alice's desktop"], found
        assert found[0]["peers"] and all(f"/ip4/{alice.ip}/tcp/" in p for p in found[0]["peers"]), found

        node.request("PUT", "/api/settings", {**settings, "lan_discovery": False})
        assert wait_for(lambda: not node.request("GET", "/api/lan/swarms")["announcing"], 30)
        time.sleep(2)  # the goodbye packets go out as discovery closes
        listener = start_probe(lab, bob, "raw-listen", "5")
        assert raw_counts(listener)["corolla"] == 0  # off again: silent
        assert browse(lab, bob, 3) == []
    finally:
        node.stop()
