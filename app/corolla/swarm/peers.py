"""Starting hivemind peers the way Corolla wants them: NAT port mapping off unless asked for."""

from __future__ import annotations

from collections.abc import Sequence

from hivemind import DHT

from corolla.swarm.relays import relay_options

LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    client_mode: bool = False,
    host_maddrs: Sequence[str] = LOOPBACK_MADDRS,
    announce_maddrs: Sequence[str] = (),
    identity_path: str | None = None,
    nat_port_map: bool = False,
    use_relay: bool = True,
    use_auto_relay: bool = False,
    auto_nat: bool = True,
    force_reachability: str | None = None,
    trusted_relays: Sequence[str] = (),
    num_workers: int = 32,
    startup_timeout: float = 60.0,
) -> DHT:
    """A running hivemind DHT (a forked child process) and its p2pd daemon.

    `nat_port_map` stays off by default: hivemind's own default probes the gateway with NAT-PMP
    and UPnP, which a user did not ask for and which loopback-only tests must never do.
    """
    return DHT(
        initial_peers=list(initial_peers),
        start=True,
        client_mode=client_mode,
        num_workers=num_workers,
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        identity_path=identity_path,
        nat_port_map=nat_port_map,
        use_relay=use_relay,
        use_auto_relay=use_auto_relay,
        auto_nat=auto_nat,
        startup_timeout=startup_timeout,
        **relay_options(force_reachability, trusted_relays),
    )
