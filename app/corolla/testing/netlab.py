"""A network lab of simulated homes, built from Linux network namespaces, for tests and benchmarks.

Layout (every namespace is created from inside the test's own loopback-only namespace, and the only
links are veth pairs between lab namespaces, so no packet can reach the machine's real network):

    "internet": one bridge (namespace <tag>-inet) on 11.77.0.0/24
      public host i   11.77.0.(10+i)                     (directly reachable)
      home i router   11.77.0.(100+i) | 192.168.i.1/24   (MASQUERADE, stateful firewall, no forwarding)
        home host      192.168.i.10                       (reachable only through its own connections)

A public-looking internet range on purpose (11.0.0.0/8 is neither private nor reserved to libp2p):
- libp2p's AutoNAT never dials back private addresses (10/8, 172.16/12, 192.168/16, 100.64/10), so on
  a private "internet" a stock Petals server behind NAT never learns that it is private and never
  takes a relay; on 11.77.0.0/24 its AutoNAT and auto-relay work as on the real internet;
- libp2p treats documentation ranges (198.51.100.0/24, ...) as unroutable, and its peer routing then
  fails even between public peers.
These addresses are safe: the lab's namespaces have no link to the machine's network (only veth pairs
between lab namespaces) and no default route out of the internet segment, so no packet can leave;
`NetLab.leaks()` checks that, and the lab's own test asserts it. COROLLA_LAB_INTERNET=10.77.0 builds
the old private-range lab (for comparing libp2p's behaviour).

Bandwidth: tbf on every link's egress. This kernel has no netem, so delay and loss live in user
space: `DelayForwarder` is a TCP forwarder in front of a host's announced address (peers dial the
announced address, so every connection to that host gets the delay; a loss is modelled as TCP
experiences it, a chunk held back by one retransmission timeout).

Processes run in a host's namespace through `ip netns exec`. Namespace names carry this process's
id, so concurrent labs never collide and leftovers of a dead run are swept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

INTERNET = os.environ.get("COROLLA_LAB_INTERNET", "11.77.0")
NETNS_DIR = Path("/run/netns")
_PREFIX = "cl"


class LabUnavailable(RuntimeError):
    """Namespaces, veth, bridges or iptables cannot be used here (not root, no iptables, ...)."""


@dataclass
class Host:
    name: str
    ns: str
    ip: str  # the address on its own link (LAN address for a home host)
    public_ip: str  # where the internet sees it: its own address, or its router's
    home: Home | None = None

    @property
    def behind_nat(self) -> bool:
        return self.home is not None


@dataclass
class Home:
    index: int
    router_ns: str
    wan_ip: str
    lan_prefix: str
    hosts: list[Host] = field(default_factory=list)


def _sh(*argv: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise LabUnavailable(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def lab_unavailable_reason() -> str | None:
    """None where a lab can be built here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth, iptables)"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (apt-get install -y iproute2 iptables)"
    probe = f"{_PREFIX}{os.getpid()}probe"
    try:
        _sh("ip", "netns", "add", probe)
        _sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "MASQUERADE")
        _sh("ip", "-n", probe, "link", "add", "tbr", "type", "bridge")
    except (LabUnavailable, OSError, subprocess.TimeoutExpired) as error:
        return f"network namespaces cannot be made here: {error}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return None


def sweep_stale_namespaces() -> None:
    """Delete lab namespaces whose owning process is gone (a killed test run)."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        name = entry.name
        if not name.startswith(_PREFIX) or "-" not in name:
            continue
        pid = name[len(_PREFIX) : name.index("-")]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _sh("ip", "netns", "del", name, check=False)


class NetLab:
    """The internet bridge, public hosts and NAT'd homes. Use as a context manager; close() undoes all."""

    def __init__(self, rate: str = "100mbit"):
        reason = lab_unavailable_reason()
        if reason:
            raise LabUnavailable(reason)
        sweep_stale_namespaces()
        self.tag = f"{_PREFIX}{os.getpid()}-{random.randrange(16**4):04x}"
        self.rate = rate
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.homes: list[Home] = []
        self._processes: list[subprocess.Popen] = []
        self._links = 0
        self.inet = self._netns("inet")
        self._ip(self.inet, "link", "add", "br0", "type", "bridge")
        self._ip(self.inet, "link", "set", "br0", "up")

    # --- building -----------------------------------------------------------------------------------
    def _netns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        _sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def _ip(ns: str, *argv: str) -> None:
        _sh("ip", "-n", ns, *argv)

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair between two namespaces, both ends up and shaped by tbf on egress."""
        self._links += 1
        tmp_a, tmp_b = f"cla{os.getpid() % 10000}x{self._links}", f"clb{os.getpid() % 10000}x{self._links}"
        _sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _sh("ip", "link", "set", tmp_a, "netns", ns_a)
        _sh("ip", "link", "set", tmp_b, "netns", ns_b)
        for ns, tmp, name in ((ns_a, tmp_a, name_a), (ns_b, tmp_b, name_b)):
            self._ip(ns, "link", "set", tmp, "name", name)
            self._ip(ns, "link", "set", name, "up")
            self.shape(ns, name, self.rate)

    def shape(self, ns: str, device: str, rate: str) -> None:
        """Bandwidth of a link's egress (tbf; burst sized for ~10 ms at that rate, at least 32 KB)."""
        _sh(
            "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", device, "root",
            "tbf", "rate", rate, "burst", "64kb", "latency", "100ms",
        )  # fmt: skip

    def _attach_to_internet(self, ns: str, device: str, address: str) -> None:
        port = f"p{len(self.namespaces)}"
        self._veth(self.inet, port, ns, device)
        self._ip(self.inet, "link", "set", port, "master", "br0")
        self._ip(ns, "addr", "add", f"{address}/24", "dev", device)

    def add_public(self, name: str) -> Host:
        index = sum(1 for h in self.hosts.values() if not h.behind_nat)
        address = f"{INTERNET}.{10 + index}"
        ns = self._netns(name)
        self._attach_to_internet(ns, "eth0", address)
        host = Host(name, ns, address, address)
        self.hosts[name] = host
        return host

    def add_home(self, name: str) -> Host:
        """A home: a NAT router on the internet and one host on its LAN."""
        index = len(self.homes) + 1
        router = self._netns(f"r{index}")
        wan_ip, lan_prefix = f"{INTERNET}.{100 + index}", f"192.168.{index}"
        self._attach_to_internet(router, "wan", wan_ip)
        home = Home(index, router, wan_ip, lan_prefix)
        # The home's LAN is a bridge in the router (as a home router's switch): more hosts can join it
        # (add_home_host), and broadcast and multicast (mDNS) reach every host of the home.
        self._ip(router, "link", "add", "lan", "type", "bridge")
        self._ip(router, "link", "set", "lan", "up")
        self._ip(router, "addr", "add", f"{lan_prefix}.1/24", "dev", "lan")
        rules = [
            ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"],
            ["iptables", "-P", "FORWARD", "DROP"],
            ["iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["iptables", "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT"],
            # Within the LAN the bridge switches freely (where br_netfilter is loaded, bridged frames
            # meet this FORWARD chain too, and the DROP policy would cut the home's hosts apart).
            ["iptables", "-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT"],
            # The router itself accepts nothing from outside that it did not ask for.
            ["iptables", "-P", "INPUT", "DROP"],
            ["iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
            ["iptables", "-A", "INPUT", "-i", "lan", "-j", "ACCEPT"],
            ["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ]
        for rule in rules:
            _sh(*self.exec_argv(router, rule))
        self.homes.append(home)
        return self.add_home_host(home, name)

    def add_home_host(self, home: Home, name: str) -> Host:
        """One more computer on a home's LAN (192.168.i.10, .11, ...), behind the same router."""
        ns = self._netns(name)
        port = f"lp{len(home.hosts)}"
        self._veth(home.router_ns, port, ns, "eth0")
        self._ip(home.router_ns, "link", "set", port, "master", "lan")
        address = f"{home.lan_prefix}.{10 + len(home.hosts)}"
        self._ip(ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip(ns, "route", "add", "default", "via", f"{home.lan_prefix}.1")
        host = Host(name, ns, address, home.wan_ip, home)
        home.hosts.append(host)
        self.hosts[name] = host
        return host

    def forward_port(self, host: Host, port: int) -> None:
        """Port forwarding on the host's router: WAN port -> the host (what a user sets up by hand)."""
        assert host.home is not None
        router = host.home.router_ns
        for rule in (
            ["iptables", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "tcp", "--dport", str(port),
             "-j", "DNAT", "--to-destination", f"{host.ip}:{port}"],
            ["iptables", "-A", "FORWARD", "-i", "wan", "-o", "lan", "-p", "tcp", "-d", host.ip, "--dport", str(port),
             "-j", "ACCEPT"],
        ):  # fmt: skip
            _sh(*self.exec_argv(router, rule))

    def open_port_mapping(self, host: Host, workdir: Path) -> subprocess.Popen:
        """A router that forwards ports on request (UPnP IGD and NAT-PMP): Debian's miniupnpd in the host's
        router, allowed to map ports of its LAN only, its rules in an nftables table of its own (the
        router's firewall lets in what a mapping forwards, as a home router's does). LabUnavailable
        without miniupnpd (apt-get install miniupnpd)."""
        binary = shutil.which("miniupnpd") or "/usr/sbin/miniupnpd"
        if host.home is None or not Path(binary).is_file():
            raise LabUnavailable("miniupnpd is not installed (apt-get install miniupnpd)")
        router, workdir = host.home.router_ns, Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "upnp.nft").write_text(
            "table inet miniupnpd {\n"
            "  chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }\n"
            "  chain miniupnpd { }\n"
            "  chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }\n"
            "  chain postrouting { type nat hook postrouting priority 100; policy accept;\n"
            "    jump postrouting_miniupnpd; }\n"
            "  chain prerouting_miniupnpd { }\n"
            "  chain postrouting_miniupnpd { }\n"
            "}\n"
        )
        _sh(*self.exec_argv(router, ["nft", "-f", str(workdir / "upnp.nft")]))
        accept = ["iptables", "-A", "FORWARD", "-i", "wan", "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"]
        _sh(*self.exec_argv(router, accept))
        (workdir / "miniupnpd.conf").write_text(
            "ext_ifname=wan\nlistening_ip=lan\nenable_natpmp=yes\nenable_upnp=yes\nsecure_mode=yes\n"
            "system_uptime=yes\nupnp_table_name=miniupnpd\nupnp_nat_table_name=miniupnpd\n"
            "upnp_forward_chain=miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n"
            "upnp_nat_postrouting_chain=postrouting_miniupnpd\nuuid=b71361f7-eece-4aaa-baf8-8f6f88a9852f\n"
            f"allow 1024-65535 {host.home.lan_prefix}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
        )
        argv = [binary, "-d", "-f", str(workdir / "miniupnpd.conf"), "-P", str(workdir / "miniupnpd.pid")]
        with open(workdir / "miniupnpd.log", "ab") as log:
            process = subprocess.Popen(
                self.exec_argv(router, argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._processes.append(process)
        return process

    def port_mappings(self, host: Host) -> list[int]:
        """The WAN ports the host's router forwards on request now (miniupnpd's rules)."""
        import re

        rules = _sh(*self.exec_argv(host.home.router_ns, ["nft", "list", "chain", "inet", "miniupnpd",
                                                           "prerouting_miniupnpd"]), check=False).stdout  # fmt: skip
        return [int(port) for port in re.findall(r"dport (\d+) dnat", rules)]

    def leaks(self) -> list[str]:
        """Every way out of the lab found (empty when sealed): a link that is not the lab's own (loopback,
        veth, bridge) in any lab namespace, or a route off the internet segment from a public host or router."""
        found = []
        for ns in self.namespaces:
            for line in _sh("ip", "-n", ns, "-o", "-d", "link", "show").stdout.splitlines():
                name = line.split(":")[1].strip().split("@")[0]
                if not any(kind in line for kind in ("link/loopback", " veth ", " bridge ")):
                    found.append(f"{ns}: link {name}")
            homes_lan = ns.endswith(tuple(f"-{h.name}" for h in self.hosts.values() if h.behind_nat))
            for route in _sh("ip", "-n", ns, "route", "show").stdout.splitlines():
                if route.startswith("default") and not homes_lan:  # a home host's default goes to its router
                    found.append(f"{ns}: route {route}")
        return found

    # --- faults -------------------------------------------------------------------------------------
    def cut_home(self, host: Host) -> None:
        """The home's router stops forwarding, and its NAT state is lost (its WAN link goes down,
        which makes the kernel forget every masqueraded connection, as a router reboot does)."""
        assert host.home is not None
        self._ip(host.home.router_ns, "link", "set", "wan", "down")

    def restore_home(self, host: Host) -> None:
        assert host.home is not None
        self._ip(host.home.router_ns, "link", "set", "wan", "up")

    def cut_host(self, host: Host) -> None:
        """A host loses its link (its machine or its connection dies)."""
        self._ip(host.ns, "link", "set", "eth0", "down")

    # --- processes ----------------------------------------------------------------------------------
    def popen(self, host: Host, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process inside a host's namespace, in its own process group; stopped by close()."""
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(self.exec_argv(host.ns, argv), **kwargs)
        self._processes.append(process)
        return process

    def run(self, host: Host, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.exec_argv(host.ns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def can_connect(self, source: Host, address: str, port: int, timeout: float = 2.0) -> bool:
        """A TCP connect from `source` to address:port (the firewall check of the lab's own tests)."""
        code = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout})\n"
            f"sys.exit(0 if s.connect_ex(({address!r},{port}))==0 else 1)\n"
        )
        return self.run(source, [sys.executable, "-c", code], timeout=timeout + 10).returncode == 0

    def forwarder(
        self, host: Host, listen_port: int, target_port: int, delay_ms: float, loss: float = 0.0
    ) -> subprocess.Popen:
        """A DelayForwarder in `host`'s namespace: host.ip:listen_port -> 127.0.0.1:target_port."""
        argv = [
            sys.executable, str(Path(__file__).resolve()), "forward",
            "--listen", f"{host.ip}:{listen_port}", "--target", f"127.0.0.1:{target_port}",
            "--delay-ms", str(delay_ms), "--loss", str(loss),
        ]  # fmt: skip
        process = self.popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = process.stdout.readline()
        if "listening" not in line:
            raise LabUnavailable(f"the delay forwarder did not start: {line}{process.stdout.read()[-500:]}")
        return process

    # --- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, 15)
        deadline = time.monotonic() + 10
        for process in self._processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, 9)
        for ns in reversed(self.namespaces):
            _sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the delaying TCP forwarder (run as a script inside a host's namespace) -----------------------------

LOSS_PENALTY_S = 0.2  # one TCP retransmission timeout (Linux's minimum RTO)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, loss: float) -> None:
    """Bytes in order, each chunk delivered `delay` seconds after it arrived (plus an RTO if 'lost')."""
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    last_due = 0.0
    try:
        while True:
            chunk = await reader.read(65536)
            due = time.monotonic() + delay + (LOSS_PENALTY_S if loss and random.random() < loss else 0.0)
            last_due = max(last_due, due)  # TCP keeps order: a late chunk holds back the ones after it
            queue.put_nowait((last_due, chunk))
            if not chunk:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _forward(listen: str, target: str, delay: float, loss: float) -> None:
    target_host, target_port = target.rsplit(":", 1)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(target_host, int(target_port)), timeout=10
            )
        except (OSError, TimeoutError):
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, up_writer, delay, loss), _pipe(up_reader, writer, delay, loss), return_exceptions=True
        )

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(on_client, host, int(port), reuse_address=True)
    print(f"listening on {listen}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="netlab helper")
    sub = parser.add_subparsers(dest="command", required=True)
    forward = sub.add_parser("forward", help="a delaying TCP forwarder")
    forward.add_argument("--listen", required=True)
    forward.add_argument("--target", required=True)
    forward.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    forward.add_argument("--loss", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(_forward(args.listen, args.target, args.delay_ms / 1000.0, args.loss))


if __name__ == "__main__":
    main()
