"""Inviting friends in other homes, in the network lab (corolla/testing/netlab.py), everything through the
node's API as the window drives it: no `corolla serve` flags, no hand-written multiaddrs.

A is on the lab's internet, B (and C, D) each behind their own NAT router. A chooses "Let others join";
its invite survives pause, resume and a restart of its node (kept key and port); bad invites get one
sentence and change nothing; B joins with A's invite, contributes and chats. The SmolLM2 story (three
homes each serving a third of the blocks; A restarts and D joins with the old invite) needs
COROLLA_TEST_SMOLLM2.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import pytest

from corolla.testing.lab_swarm import LabNode
from corolla.testing.netlab import LabUnavailable, NetLab, lab_unavailable_reason

pytestmark = pytest.mark.slow
TINY = {"COROLLA_DEFAULT_MODEL": "tiny"}


@pytest.fixture(scope="module")
def lab():
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        with NetLab() as lab:
            lab.add_public("alice")
            lab.add_home("bob")
            lab.add_home("carol")
            lab.add_home("dave")
            yield lab
    except LabUnavailable as error:
        pytest.skip(str(error))


def _invite_peers(invite: str) -> list[str]:
    body = invite.split(":", 1)[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["peers"]


def _let_others_join(node: LabNode, **extra) -> dict:
    settings = node.request("GET", "/api/settings")
    return node.request("PUT", "/api/settings", {**settings, "listen_on_lan": True, **extra})


def _online_with_invite(node: LabNode, timeout: float = 300) -> dict:
    return node.wait_status(
        lambda s: s["contribution"]["state"] == "online" and s.get("invite"), timeout, "invite while online"
    )


def test_the_invite_of_a_public_node_survives_pause_resume_and_restart(lab, tmp_path):
    alice = lab.hosts["alice"]
    home = tmp_path / "alice"
    node = LabNode(lab, alice, home, extra_env=TINY)
    try:
        status = node.wait_status(lambda s: s["contribution"]["state"] == "online", 300, "online")
        # "This computer only" (the default): no invite, and the window says what the choice means.
        assert status["invite"] is None and status["sharing"]["choice"] == "local"
        assert "nobody else" in status["sharing"]["sentence"]
        settings = _let_others_join(node)
        port = settings["swarm_port"]
        status = _online_with_invite(node)
        assert status["sharing"]["sentence"] == f"Let others join: other computers connect to this one on port {port}."
        assert status["sharing"]["outside"] == "yes", status["sharing"]  # A has a public address
        peers = _invite_peers(status["invite"])
        assert peers[0] == f"/ip4/{alice.ip}/tcp/{port}/p2p/{status['contribution']['peer_id']}", peers
        assert not any(p.startswith("/ip4/127.") for p in peers)
        key = home / "config" / "swarm-identity.key"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        first = (status["contribution"]["peer_id"], port, status["invite"])

        node.request("POST", "/api/contribution/pause")
        node.wait_status(lambda s: s["contribution"]["state"] == "paused", 60, "paused")
        node.request("POST", "/api/contribution/resume")
        status = _online_with_invite(node)
        assert (status["contribution"]["peer_id"], status["sharing"]["port"], status["invite"]) == first
    finally:
        node.stop()
    node = LabNode(lab, alice, home, extra_env=TINY)
    try:
        status = _online_with_invite(node)
        assert (status["contribution"]["peer_id"], status["sharing"]["port"], status["invite"]) == first
        assert status["sharing"]["port_notice"] is None
    finally:
        node.stop()


def test_bad_invites_get_a_sentence_each_and_change_nothing(lab, tmp_path):
    bob = lab.hosts["bob"]
    node = LabNode(lab, bob, tmp_path / "bob", extra_env={**TINY, "COROLLA_AWAIT_CONSENT": "1"})
    try:
        before = node.request("GET", "/api/settings")
        down = "/ip4/11.77.0.10/tcp/31999/p2p/QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
        dead = (
            "corolla-invite:"
            + base64.urlsafe_b64encode(
                json.dumps({"v": 2, "peers": [down], "dht_prefix": "x", "model": "m"}).encode()
            ).decode()
        )
        cases = [
            ("corolla-invite:eyJ2IjoyLCJwZWVycyI6W", 400, "damaged"),
            ("https://example.org/join/1234", 400, "not a Corolla invite"),
            ("corolla-invite:" + "A" * 20000, 400, "too long"),
            (dead, 503, "tried 11.77.0.10:31999"),
        ]
        for invite, code, says in cases:
            status, body = node.call("POST", "/api/settings/join", {"invite": invite}, timeout=60)
            assert status == code and says in body["message"], (invite[:40], status, body)
            assert "\n" not in body["message"]
        assert node.request("GET", "/api/settings") == before
    finally:
        node.stop()


def test_a_friend_behind_nat_joins_with_the_invite_contributes_and_chats(lab, tmp_path, record_property):
    alice, bob = lab.hosts["alice"], lab.hosts["bob"]
    a = LabNode(lab, alice, tmp_path / "alice", extra_env=TINY)
    b = LabNode(lab, bob, tmp_path / "bob", extra_env={**TINY, "COROLLA_AWAIT_CONSENT": "1"})
    try:
        a.wait_status(lambda s: s["contribution"]["state"] == "online", 300, "online")
        _let_others_join(a)
        invite = _online_with_invite(a)["invite"]
        pasted = time.monotonic()
        joined = b.request("POST", "/api/settings/join", {"invite": invite})
        assert joined["swarm"] == "custom" and joined["custom_peers"][0].startswith(f"/ip4/{alice.ip}/")
        b.request("POST", "/api/contribution/start")
        status = b.wait_status(lambda s: s["contribution"]["state"] == "online", 300, "contributing")
        contributing_s = time.monotonic() - pasted
        reply = b.chat("What is the capital of France?")
        first_reply_s = time.monotonic() - pasted
        assert reply["end"]["type"] == "done", reply
        # B is behind NAT: its invite carries its relay address through A, and the members it joined through.
        status = b.wait_status(lambda s: s.get("invite"), 120, "an invite of its own")
        peers = _invite_peers(status["invite"])
        assert any(p.startswith(f"/ip4/{alice.ip}/") for p in peers), peers
        record_property("paste_to_contributing_s", round(contributing_s, 1))
        record_property("paste_to_first_reply_s", round(first_reply_s, 1))
        print(f"tiny: paste->contributing {contributing_s:.1f} s, paste->first reply {first_reply_s:.1f} s")
        swarm = b.request("GET", "/api/swarm")
        assert swarm and swarm[0]["servers"], swarm
    finally:
        b.stop()
        a.stop()


def test_a_friend_joins_from_the_first_run_dialog_in_one_paste(lab, tmp_path):
    """The window's way: paste the invite in the welcome dialog, agree; a damaged paste is explained first
    and changes nothing. The node then contributes with the swarm's model and chats."""
    import sys

    alice, carol = lab.hosts["alice"], lab.hosts["carol"]
    a = LabNode(lab, alice, tmp_path / "alice", extra_env=TINY)
    c = LabNode(lab, carol, tmp_path / "carol", extra_env={**TINY, "COROLLA_AWAIT_CONSENT": "1"})
    try:
        a.wait_status(lambda s: s["contribution"]["state"] == "online", 300, "online")
        _let_others_join(a)
        invite = _online_with_invite(a)["invite"]
        before = c.request("GET", "/api/settings")
        script = str(Path(__file__).parent / "support" / "invite_gui_join.py")
        result = lab.run(carol, [sys.executable, script, c.url, c.token, invite], timeout=180)
        report = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
        assert report.get("accepted"), (report, result.stderr[-3000:])
        assert "This invite does not work" in report["damaged_error"] and "damaged" in report["damaged_error"]
        assert report["open_after_damaged"] and report["save_text"] == "Agree and start contributing"
        settings = c.request("GET", "/api/settings")
        assert settings["swarm"] == "custom" and settings["custom_peers"] != before["custom_peers"]
        c.wait_status(lambda s: s["contribution"]["state"] == "online", 300, "contributing")
        contributing_s = time.time() - report["pasted_at"]
        reply = c.chat("What is the capital of France?")
        assert reply["end"]["type"] == "done", reply
        _figures(
            "tiny, first-run dialog",
            {
                "paste_to_contributing_s": round(contributing_s, 1),
                "paste_to_first_reply_s": round(time.time() - report["pasted_at"], 1),
            },
        )
    finally:
        c.stop()
        a.stop()


def test_behind_a_home_router_the_window_says_so_before_sharing_with_the_fix(lab, tmp_path):
    """Everyone behind NAT: the creator's node says that people in other homes probably cannot reach it,
    and how to fix it (forward port N to this LAN address, NAT-PMP/UPnP, a reachable member's invite)."""
    dave = lab.hosts["dave"]
    node = LabNode(lab, dave, tmp_path / "dave", extra_env=TINY)
    try:
        node.wait_status(lambda s: s["contribution"]["state"] == "online", 300, "online")
        port = _let_others_join(node)["swarm_port"]
        status = _online_with_invite(node)
        sharing = status["sharing"]
        assert sharing["outside"] == "no", sharing
        assert dave.ip in sharing["outside_sentence"] and "behind a router" in sharing["outside_sentence"]
        assert sharing["fixes"][0].startswith(f"Forward TCP port {port} on your router to this computer ({dave.ip})")
        assert any("NAT-PMP/UPnP" in fix for fix in sharing["fixes"])
        assert any("reachable" in fix for fix in sharing["fixes"])
        assert f"/ip4/{dave.ip}/tcp/{port}/" in _invite_peers(status["invite"])[0]  # its neighbours can join
    finally:
        node.stop()


def test_with_the_port_forwarded_by_hand_a_friend_in_another_home_joins_and_chats(lab, tmp_path):
    """Everyone behind NAT, the fix taken: the creator's router forwards the kept port (a DNAT rule) and
    the user enters the router's public address; the invite then starts with it and B, in another home,
    joins and chats."""
    dave, bob = lab.hosts["dave"], lab.hosts["bob"]
    d = LabNode(lab, dave, tmp_path / "dave", extra_env={**TINY, "COROLLA_AWAIT_CONSENT": "1"})
    b = LabNode(lab, bob, tmp_path / "bob", extra_env={**TINY, "COROLLA_AWAIT_CONSENT": "1"})
    try:
        port = _let_others_join(d)["swarm_port"]
        lab.forward_port(dave, port)
        _let_others_join(d, public_address=dave.public_ip)
        d.request("POST", "/api/contribution/start")
        status = d.wait_status(
            lambda s: s["contribution"]["state"] == "online" and s.get("invite") and s["sharing"]["outside"] == "yes",
            300,
            "reachable with an invite",
        )
        assert _invite_peers(status["invite"])[0].startswith(f"/ip4/{dave.public_ip}/tcp/{port}/p2p/")
        pasted = time.monotonic()
        b.request("POST", "/api/settings/join", {"invite": status["invite"]})
        b.request("POST", "/api/contribution/stop")  # B only chats
        reply, tries = _chat_until_answered(b, "What is the capital of France?", 120)
        assert reply["end"]["type"] == "done", reply
        _figures(
            "tiny, port forwarded", {"paste_to_first_reply_s": round(time.monotonic() - pasted, 1), "tries": tries}
        )
    finally:
        b.stop()
        d.stop()


def smollm2_folder() -> Path | None:
    folder = os.environ.get("COROLLA_TEST_SMOLLM2")
    return Path(folder) if folder and Path(folder, "config.json").is_file() else None


def _figures(name: str, figures: dict) -> None:
    """Printed, and written next to the test's temporary files for the README's table."""
    print(f"{name}: {json.dumps(figures)}", flush=True)


def _start_contributing(node: LabNode, **settings) -> None:
    current = node.request("GET", "/api/settings")
    node.request("PUT", "/api/settings", {**current, **settings})
    node.request("POST", "/api/contribution/start")


def _chat_until_answered(node: LabNode, prompt: str, budget_s: float) -> tuple[dict, int]:
    """The first reply that completes (a chat sent too early fails with a sentence; the user tries again)."""
    deadline, tries = time.monotonic() + budget_s, 0
    while True:
        tries += 1
        reply = node.chat(prompt, max_new_tokens=12)
        if (reply["end"] and reply["end"]["type"] == "done") or time.monotonic() > deadline:
            return reply, tries
        time.sleep(3)


def test_smollm2_across_three_homes_and_a_new_friend_after_the_creator_restarts(lab, tmp_path):
    """A (public) creates the swarm; B and C (each behind NAT) join with A's invite and serve a third of
    SmolLM2 each; C's chat answers "Paris" through all three. A's node restarts; D joins with the invite
    A shared before and chats."""
    folder = smollm2_folder()
    if folder is None:
        pytest.skip("set COROLLA_TEST_SMOLLM2 to a converted SmolLM2-135M-Instruct folder")
    consent = {"COROLLA_AWAIT_CONSENT": "1"}
    homes = {name: tmp_path / name for name in ("alice", "bob", "carol", "dave")}
    own = {"model": str(folder), "num_blocks": 10, "torch_dtype": "float32"}
    a = LabNode(lab, lab.hosts["alice"], homes["alice"], extra_env=consent)
    nodes = [a]
    try:
        _start_contributing(a, **own, listen_on_lan=True, public_name="Alice")
        status = _online_with_invite(a, 600)
        invite, alice_id = status["invite"], status["contribution"]["peer_id"]
        figures: dict = {}
        ids = {"alice": alice_id}
        for name in ("bob", "carol"):
            node = LabNode(lab, lab.hosts[name], homes[name], extra_env=consent)
            nodes.append(node)
            pasted = time.monotonic()
            node.request("POST", "/api/settings/join", {"invite": invite})
            _start_contributing(node, num_blocks=10, torch_dtype="float32", public_name=name.title())
            status = node.wait_status(lambda s: s["contribution"]["state"] == "online", 600, "contributing")
            figures[f"{name}_paste_to_contributing_s"] = round(time.monotonic() - pasted, 1)
            ids[name] = status["contribution"]["peer_id"]
            if name == "carol":
                reply, tries = _chat_until_answered(node, "What is the capital of France?", 240)
                figures["carol_paste_to_first_reply_s"] = round(time.monotonic() - pasted, 1)
                figures["carol_chat_tries"] = tries
                assert reply["end"]["type"] == "done" and "Paris" in reply["text"], reply
                seen = {r["peer_id"] for r in reply["end"]["seen_by"]}
                assert {ids["alice"], ids["bob"], ids["carol"]} <= seen, (seen, ids)
        carol = nodes[2]
        swarm = carol.request("GET", "/api/swarm")
        names = {s.get("public_name") for s in swarm[0]["servers"]}
        assert {"Alice", "Bob", "Carol"} <= names, names

        # A's node restarts (same key, same port): a new friend D joins with the invite shared before.
        a.stop()
        nodes.remove(a)
        restarted = time.monotonic()
        a = LabNode(lab, lab.hosts["alice"], homes["alice"])
        nodes.append(a)
        status = _online_with_invite(a, 600)
        assert status["contribution"]["peer_id"] == alice_id
        figures["alice_restart_to_online_s"] = round(time.monotonic() - restarted, 1)
        d = LabNode(lab, lab.hosts["dave"], homes["dave"], extra_env=consent)
        nodes.append(d)
        pasted = time.monotonic()
        d.request("POST", "/api/settings/join", {"invite": invite})
        d.request("POST", "/api/contribution/stop")  # D only chats
        reply, tries = _chat_until_answered(d, "What is the capital of France?", 300)
        figures["dave_after_restart_paste_to_first_reply_s"] = round(time.monotonic() - pasted, 1)
        figures["dave_chat_tries"] = tries
        assert reply["end"]["type"] == "done" and "Paris" in reply["text"], reply

        # Privacy across homes (issue 28), as the Chat pane sets it: a chat only the three homes may read
        # answers through them alone; one only A may read fails at once, naming the blocks A lacks.
        trusted = [ids["alice"], ids["bob"], ids["carol"]]
        reply = d.chat("What is the capital of France?", 12, privacy={"level": "peers", "peers": trusted})
        assert reply["end"]["type"] == "done" and "Paris" in reply["text"], reply
        assert {r["peer_id"] for r in reply["end"]["seen_by"]} <= set(trusted), reply["end"]["seen_by"]
        reply = d.chat("What is the capital of France?", 12, privacy={"level": "peers", "peers": [ids["alice"]]})
        assert reply["end"]["type"] == "error" and "block(s)" in reply["end"]["message"], reply
        assert reply["text"] == "", reply
        swarm = d.call("GET", "/api/swarm")
        assert swarm[0] == 200, swarm
        _figures("smollm2 three homes", figures)
    finally:
        for node in reversed(nodes):
            node.stop()


def _swarm_coverage(node: LabNode) -> tuple[set[int], set[str]]:
    """The blocks online servers cover, and those servers' peer ids, as the Swarm pane reads them."""
    status, swarm = node.call("GET", "/api/swarm", timeout=90)
    if status != 200 or not swarm:
        return set(), set()
    online = [s for s in swarm[0]["servers"] if s["state"].lower() == "online"]
    return {b for s in online for b in range(s["start_block"], s["end_block"])}, {s["peer_id"] for s in online}


def test_the_creator_leaves_for_good_and_the_others_keep_chatting(lab, tmp_path):
    """No special creator. A (public) creates the swarm; B, C and D (each behind NAT) join with the invite A
    shared when it was alone, and each serve a third of the blocks. B's router forwards B's kept port and
    B enters its public address (p2pd has no hole punching: NAT'd members reach each other only through a
    member others can dial, so the story needs one besides A). C and D learn B's address from the swarm,
    not from any invite. A leaves for good: C's and D's relays move to B, the blocks A served are covered
    again, and C and D chat; each node's sharing status says who can be reached."""
    hosts = {name: lab.hosts[name] for name in ("alice", "bob", "carol", "dave")}
    consent = {**TINY, "COROLLA_AWAIT_CONSENT": "1"}
    nodes = {name: LabNode(lab, hosts[name], tmp_path / name, extra_env=consent) for name in hosts}
    figures: dict = {}
    try:
        a, b, c, d = (nodes[name] for name in hosts)
        _start_contributing(a, listen_on_lan=True, num_blocks=2, public_name="Alice")
        status = _online_with_invite(a)
        invite, ids = status["invite"], {"alice": status["contribution"]["peer_id"]}
        assert {p.rsplit("/p2p/", 1)[1] for p in _invite_peers(invite)} == {ids["alice"]}  # A alone so far

        b.request("POST", "/api/settings/join", {"invite": invite})
        port = b.request("GET", "/api/settings")["swarm_port"]
        lab.forward_port(hosts["bob"], port)  # what Bob does on his router, then in Settings
        _start_contributing(b, num_blocks=2, public_name="Bob", public_address=hosts["bob"].public_ip)
        status = b.wait_status(
            lambda s: s["contribution"]["state"] == "online" and s["sharing"]["outside"] == "yes", 300, "reachable"
        )
        ids["bob"] = status["contribution"]["peer_id"]
        bob_public = f"/ip4/{hosts['bob'].public_ip}/tcp/{port}/p2p/{ids['bob']}"
        for name, node in (("carol", c), ("dave", d)):
            node.request("POST", "/api/settings/join", {"invite": invite})  # A's invite, from before B came
            _start_contributing(node, num_blocks=2, public_name=name.title())
            ids[name] = node.wait_status(lambda s: s["contribution"]["state"] == "online", 300, "online")[
                "contribution"
            ]["peer_id"]
        reply, _ = _chat_until_answered(c, "What is the capital of France?", 240)
        assert reply["end"]["type"] == "done", reply

        # C and D learn B from the swarm (each reachable member announces its addresses) and keep it.
        for node in (c, d):
            deadline = time.monotonic() + 120
            while bob_public not in node.request("GET", "/api/settings")["learned_peers"]:
                assert time.monotonic() < deadline, node.request("GET", "/api/settings")
                time.sleep(3)
            assert bob_public in _invite_peers(node.request("GET", "/api/status")["invite"])

        left = time.monotonic()
        a.stop()  # A leaves for good (its node says OFFLINE and exits)
        deadline = time.monotonic() + 300
        while True:
            covered, servers = _swarm_coverage(c)
            if covered == set(range(6)) and ids["alice"] not in servers:
                break
            assert time.monotonic() < deadline, (covered, servers)
            time.sleep(3)
        figures["leave_to_blocks_covered_s"] = round(time.monotonic() - left, 1)
        reply, tries = _chat_until_answered(c, "What is the capital of France?", 420)
        figures["leave_to_carol_reply_s"] = round(time.monotonic() - left, 1)
        figures["carol_chat_tries"] = tries
        assert reply["end"]["type"] == "done", reply
        reply, _ = _chat_until_answered(d, "What is the capital of France?", 240)
        assert reply["end"]["type"] == "done", reply
        figures["leave_to_dave_reply_s"] = round(time.monotonic() - left, 1)

        # What each window says now: B is reachable from outside; C and D through B's relay.
        sharing = b.request("GET", "/api/status")["sharing"]
        assert sharing["outside"] == "yes" and sharing["reachable_members"] == ["this computer"], sharing
        for node in (c, d):
            status = node.wait_status(
                lambda s: (
                    s["sharing"]["outside"] == "relay"
                    and any(ids["bob"] in a for a in s["reachability"]["relay_addrs"])
                    and "through Bob's computer" in s["sharing"]["outside_sentence"]
                ),
                180,
                "relayed through B",
            )
            assert not any(ids["alice"] in a for a in status["reachability"]["relay_addrs"]), status["reachability"]
            assert "Bob" in status["sharing"]["reachable_members"], status["sharing"]
        _figures("tiny, the creator leaves", figures)
    finally:
        for node in reversed(list(nodes.values())):
            node.stop()


def test_the_router_opens_the_port_on_request_and_a_friend_in_another_home_chats(lab, tmp_path):
    """Everyone behind NAT, the other fix taken: the home router answers UPnP/NAT-PMP (Debian's miniupnpd)
    and the user switches on 'Ask the router to open the port'. The node is then reachable from outside,
    its invite starts with the port the router opened, and B, in another home, joins with it and chats."""
    if "erin" not in lab.hosts:
        lab.add_home("erin")
    erin, bob = lab.hosts["erin"], lab.hosts["bob"]
    try:
        lab.open_port_mapping(erin, tmp_path / "router")
    except LabUnavailable as error:
        pytest.skip(str(error))
    e = LabNode(lab, erin, tmp_path / "erin", extra_env={**TINY, "COROLLA_AWAIT_CONSENT": "1"})
    b = LabNode(lab, bob, tmp_path / "bob", extra_env={**TINY, "COROLLA_AWAIT_CONSENT": "1"})
    try:
        started = time.monotonic()
        _start_contributing(e, listen_on_lan=True, nat_port_map=True)
        status = e.wait_status(
            lambda s: (
                s["contribution"]["state"] == "online"
                and s["sharing"]["outside"] == "yes"
                and s.get("invite")
                and any(f"/ip4/{erin.home.wan_ip}/" in p for p in _invite_peers(s["invite"]))
            ),
            300,
            "reachable through the router's mapping",
        )
        reachable_s = time.monotonic() - started
        mapped = lab.port_mappings(erin)
        first = _invite_peers(status["invite"])[0]
        assert mapped and any(first.startswith(f"/ip4/{erin.home.wan_ip}/tcp/{port}/p2p/") for port in mapped), (
            first,
            mapped,
        )
        pasted = time.monotonic()
        b.request("POST", "/api/settings/join", {"invite": status["invite"]})
        b.request("POST", "/api/contribution/stop")  # B only chats
        reply, tries = _chat_until_answered(b, "What is the capital of France?", 180)
        assert reply["end"]["type"] == "done", reply
        _figures(
            "tiny, port opened by the router (UPnP/NAT-PMP)",
            {
                "start_to_reachable_s": round(reachable_s, 1),
                "paste_to_first_reply_s": round(time.monotonic() - pasted, 1),
                "tries": tries,
            },
        )
    finally:
        b.stop()
        e.stop()
