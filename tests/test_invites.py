"""Invites (corolla/node/invites.py): what they carry, bounded reading, one clear sentence per refusal;
and the swarm address a node keeps (corolla/node/sharing.py): its key file and its port."""

from __future__ import annotations

import base64
import json
import socket
import stat

import pytest

from corolla.node.invites import (
    INVITE_PREFIX,
    MAX_INVITE_CHARS,
    MAX_PEERS,
    InviteError,
    make_invite,
    parse_invite,
)
from corolla.node.sharing import SwarmAddress, probe_addresses, sharing_status
from corolla.swarm.reachability import relay_candidates
from corolla.swarm.server.stats import ServerStats

A = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
B = "QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5"


def _raw(data) -> str:
    return INVITE_PREFIX + base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def test_an_invite_carries_every_address_best_first_and_reads_back():
    addrs = [
        f"/ip4/127.0.0.1/tcp/31400/p2p/{A}",
        f"/ip4/192.168.1.10/tcp/31400/p2p/{A}",
        f"/ip4/11.77.0.10/tcp/31400/p2p/{A}/p2p-circuit",
        f"/ip4/11.77.0.10/tcp/31400/p2p/{A}/p2p-circuit/p2p/{B}",
        f"/ip4/11.77.0.10/tcp/31400/p2p/{A}",
        f"/ip4/11.77.0.10/tcp/31400/p2p/{A}",  # twice: once in the invite
    ]
    invite = parse_invite(make_invite(addrs, "smol-prefix", "HuggingFaceTB/SmolLM2-135M-Instruct", "Alice"))
    assert invite.version == 2 and invite.name == "Alice"
    assert invite.dht_prefix == "smol-prefix" and invite.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert invite.peers[0] == f"/ip4/11.77.0.10/tcp/31400/p2p/{A}"  # public first, loopback last
    assert invite.peers[-1].startswith("/ip4/127.0.0.1/") and len(invite.peers) == 5
    assert invite.peer_ids == [A, B]


def test_a_version_1_invite_still_reads():
    old = _raw({"peers": [f"/ip4/10.0.0.2/tcp/4000/p2p/{A}"], "dht_prefix": "p", "model": "m"})
    invite = parse_invite(old)
    assert invite.version == 1 and invite.peers == [f"/ip4/10.0.0.2/tcp/4000/p2p/{A}"] and invite.model == "m"


def test_an_invite_wrapped_over_lines_by_a_mail_client_still_reads():
    invite = make_invite([f"/ip4/11.77.0.10/tcp/31400/p2p/{A}"], "p", "m")
    wrapped = "  " + "\n".join(invite[i : i + 60] for i in range(0, len(invite), 60)) + "\n"
    assert parse_invite(wrapped).peers == [f"/ip4/11.77.0.10/tcp/31400/p2p/{A}"]


def test_more_addresses_than_an_invite_holds_are_cut_to_the_bound():
    addrs = [f"/ip4/11.77.{i // 250}.{i % 250}/tcp/31400/p2p/{A}" for i in range(200)]
    text = make_invite(addrs, "p", "m")
    assert len(text) <= MAX_INVITE_CHARS
    assert 1 <= len(parse_invite(text).peers) <= MAX_PEERS


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("hello there", "not a Corolla invite"),
        (f"/ip4/11.77.0.10/tcp/31337/p2p/{A}", "peer address, not an invite"),
        ("corolla-invite:%%%not-base64", "damaged"),
        (make_invite([f"/ip4/11.77.0.10/tcp/31400/p2p/{A}"], "p", "m")[:-12], "damaged"),
        (_raw(["a list"]), "damaged"),
        (_raw({"peers": "one string"}), "damaged"),
        (_raw({"peers": []}), "no address"),
        (_raw({"peers": ["/ip4/1.2.3.4/udp/1/quic"]}), "not valid"),
        (_raw({"peers": [f"/ip4/1.2.3.4/tcp/1/p2p/{A}\n\x1b[31m"]}), "not valid"),
        (_raw({"peers": [f"/ip4/1.2.3.4/tcp/1/p2p/{A}"] * (MAX_PEERS + 1)}), f"at most {MAX_PEERS}"),
        (_raw({"v": 3, "peers": [f"/ip4/1.2.3.4/tcp/1/p2p/{A}"]}), "newer Corolla"),
        (_raw({"v": "2", "peers": [f"/ip4/1.2.3.4/tcp/1/p2p/{A}"]}), "damaged"),
        (_raw({"peers": [f"/ip4/1.2.3.4/tcp/1/p2p/{A}"], "model": ["x"]}), "model is not valid"),
        (INVITE_PREFIX + "A" * (MAX_INVITE_CHARS + 1), "too long"),
        ("x" * 1_000_000, "too long"),
    ],
)
def test_a_bad_invite_gets_one_sentence(text, says):
    with pytest.raises(InviteError) as caught:
        parse_invite(text)
    message = str(caught.value)
    assert says in message, message
    assert "\n" not in message and message.endswith(".") and len(message) < 300


def test_relay_candidates_are_one_reachable_address_per_peer():
    """Three addresses of one peer made go-libp2p wait its 3-minute boot delay for more relay candidates."""
    peers = [
        f"/ip4/127.0.0.1/tcp/31400/p2p/{A}",
        f"/ip4/192.168.1.10/tcp/31400/p2p/{A}",
        f"/ip4/11.77.0.10/tcp/31400/p2p/{A}",
        f"/ip4/11.77.0.10/tcp/31400/p2p/{A}/p2p-circuit",
        f"/ip4/192.168.2.10/tcp/31400/p2p/{B}",
    ]
    assert relay_candidates(peers) == [f"/ip4/11.77.0.10/tcp/31400/p2p/{A}", f"/ip4/192.168.2.10/tcp/31400/p2p/{B}"]
    # A peer known only by a loopback address is on this computer: a relay it can use (one-computer swarms).
    assert relay_candidates([f"/ip4/127.0.0.1/tcp/1/p2p/{A}"]) == [f"/ip4/127.0.0.1/tcp/1/p2p/{A}"]


def test_the_swarm_key_is_kept_private_and_the_same(tmp_path):
    address = SwarmAddress(tmp_path / "config" / "swarm-identity.key")
    key = address.identity()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    content = key.read_bytes()
    assert SwarmAddress(key).identity().read_bytes() == content  # a restart reads the same key


def test_the_port_is_kept_and_a_taken_one_is_replaced_and_said(tmp_path):
    address = SwarmAddress(tmp_path / "key")
    port = address.port_for(None, loopback_only=False, our_server_holds_it=False)
    assert address.port_notice is None  # the first choice is no change
    assert address.port_for(port, loopback_only=False, our_server_holds_it=False) == port
    with socket.socket() as other_program:
        other_program.bind(("0.0.0.0", port))
        other_program.listen()
        assert address.port_for(port, loopback_only=False, our_server_holds_it=True) == port  # our own server
        new = address.port_for(port, loopback_only=False, our_server_holds_it=False)
    assert new != port
    assert f"Port {port} was taken" in address.port_notice and f"port {new}" in address.port_notice
    assert "invite changed" in address.port_notice


def test_probing_an_invite_says_which_addresses_were_tried():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        open_port = listening.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            closed_port = closed.getsockname()[1]  # bound, not listening: refuses
            addrs = [f"/ip4/127.0.0.1/tcp/{open_port}/p2p/{A}", f"/ip4/127.0.0.1/tcp/{closed_port}/p2p/{B}"]
            answered, tried = probe_addresses(addrs, timeout=2)
    assert answered == {addrs[0]}
    assert tried == [f"127.0.0.1:{open_port}", f"127.0.0.1:{closed_port}"]


def test_the_sharing_sentences_name_the_port_and_the_fix():
    local = sharing_status(False, 31400, ["192.168.1.10"], "local", False, None)
    assert local.choice == "local" and "nobody else" in local.sentence and not local.fixes
    home = sharing_status(True, 31400, ["192.168.1.10"], "unknown", False, None)
    assert home.sentence == "Let others join: other computers connect to this one on port 31400."
    assert home.outside == "no" and "192.168.1.10" in home.outside_sentence
    assert "Forward TCP port 31400" in home.fixes[0] and "(192.168.1.10)" in home.fixes[0]
    assert any("NAT-PMP/UPnP" in fix for fix in home.fixes) and any("reachable" in fix for fix in home.fixes)
    public = sharing_status(True, 31400, ["11.77.0.10"], "direct", False, None)
    assert public.outside == "yes" and not public.fixes
    relayed = sharing_status(True, 31400, ["192.168.2.10"], "relay", True, None)
    assert relayed.outside == "relay" and not any("NAT-PMP" in fix for fix in relayed.fixes)
    # After the creator left: through whose computer this one is relayed, and who others can reach.
    relayed = sharing_status(True, 31400, ["192.168.2.10"], "relay", False, None, ["Bob"], ["Bob"])
    assert "through Bob's computer (a relay, slower)" in relayed.outside_sentence
    assert relayed.reachable_members == ["Bob"]
    bob = sharing_status(True, 31400, ["11.77.0.101"], "direct", False, None, [], [])
    assert bob.reachable_members == ["this computer"]


def test_a_new_swarm_on_a_public_address_says_so_and_one_behind_a_router_does_not():
    """The creator of a swarm has nobody to ask: listening on a public address, it is public at once (its
    relay then serves NAT'd members without waiting for AutoNAT)."""
    import asyncio

    from corolla.swarm.reachability import listens_on_public_address, plan_network

    assert listens_on_public_address(["/ip4/11.77.0.10/tcp/31400"])
    assert not listens_on_public_address(["/ip4/192.168.1.10/tcp/31400", "/ip4/100.64.0.7/tcp/1"])
    public = asyncio.run(plan_network([], ["/ip4/11.77.0.10/tcp/31400"]))
    assert public.state == "direct" and public.force_reachability == "public" and not public.client_mode
    home = asyncio.run(plan_network([], ["/ip4/192.168.1.10/tcp/31400"]))
    assert home.state == "unknown"


PEER_A = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"
PEER_B = "QmQGTqmM7NKjV6ggU1ZCap8zWiyKR89RViDXiqehSiCpY5"


def test_a_reachable_member_announces_its_dialable_addresses_public_first():
    from corolla.swarm.relays import announced_member_addrs

    visible = [
        f"/ip4/127.0.0.1/tcp/31400/p2p/{PEER_B}",
        f"/ip4/192.168.1.5/tcp/31400/p2p/{PEER_B}",
        f"/ip4/11.77.0.20/tcp/31400/p2p/{PEER_B}",
        f"/ip4/11.77.0.10/tcp/31337/p2p/{PEER_A}/p2p-circuit/p2p/{PEER_B}",
    ]
    assert announced_member_addrs(visible) == [
        f"/ip4/11.77.0.20/tcp/31400/p2p/{PEER_B}",
        f"/ip4/192.168.1.5/tcp/31400/p2p/{PEER_B}",
    ]


def test_members_learned_from_the_swarm_vouch_only_for_themselves_and_survive_the_wire():
    from corolla.swarm import protocol
    from corolla.swarm.relays import reachable_members

    own = f"/ip4/11.77.0.10/tcp/31337/p2p/{PEER_A}"
    bob = f"/ip4/11.77.0.20/tcp/31400/p2p/{PEER_B}"
    info = protocol.ServerInfo(
        protocol.ServerState.ONLINE, 10.0, 0, 2, extra={protocol.MEMBER_ADDRS_KEY: [bob, "x" * 300, *[bob] * 20]}
    )
    read = protocol.ServerInfo.from_tuple(info.to_tuple()).clamped()
    addrs = read.extra[protocol.MEMBER_ADDRS_KEY]
    assert addrs[0] == bob and len(addrs) <= protocol.MAX_MEMBER_ADDRS and "x" * 300 not in addrs
    # B's own addresses count; B naming A's address, and this peer's own record, do not.
    assert reachable_members({PEER_B: addrs, PEER_A: [own]}, PEER_A) == [bob]
    assert reachable_members({PEER_B: [own, "/ip4/1.2.3.4/tcp/1/p2p/x"]}, None) == []


def test_a_member_keeps_the_reachable_members_it_learned_from_the_swarm(tmp_path):
    """What the block server read from the swarm becomes extra initial peers and relays, kept across
    restarts of the node; an address of this computer, and one the invite already named, are not added."""
    from corolla.node.paths import NodePaths
    from corolla.node.service import NodeService

    paths = NodePaths(tmp_path / "config", tmp_path / "data", tmp_path / "cache")
    alice = f"/ip4/11.77.0.10/tcp/31337/p2p/{PEER_A}"
    bob = f"/ip4/11.77.0.101/tcp/31400/p2p/{PEER_B}"
    own = "QmRXvYWy5cVPm76s5Fd1VkNsjf2svnbHQQoG77Dx1h9nuN"
    service = NodeService(paths)
    try:
        service.apply_settings(
            service.settings.model_copy(
                update={"swarm": "custom", "custom_peers": [alice], "swarm_members": [PEER_A], "contribute": False}
            )
        )
        found = [alice, bob, f"/ip4/1.2.3.4/tcp/1/p2p/{own}"]
        service.learn_members(ServerStats.from_snapshot({"peer_id": own, "reachable_members": found}))
        assert service.settings.learned_peers == [bob]
        assert service.swarm_peers() == [alice, bob] and PEER_B in service.settings.swarm_members
    finally:
        service.close()
    service = NodeService(paths)
    try:
        assert service.settings.learned_peers == [bob]
    finally:
        service.close()
