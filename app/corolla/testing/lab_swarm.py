"""Swarm peers inside the network lab: stock Petals 2.2 and Corolla, each in a chosen lab host.

Every peer runs with NAT port mapping off (Corolla's default; the reference launcher forces it for
stock peers). Waits are bounded; every process is stopped by the lab's close() at the latest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from corolla.testing.netlab import Host, NetLab
from corolla.testing.swarm import (
    CorollaServer,
    PetalsServer,
    ProcessFailed,
    reference_dir,
    reference_env,
    require_reference,
)

LAB_PORT = 31337  # every lab host has its own port space: the same port everywhere is fine


def _wait_log(path: Path, pattern: str, process: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.3)
    tail = "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""
    raise ProcessFailed(f"no /{pattern}/ in {path.name} within {timeout} s:\n{tail}")


class StockBootstrap:
    """`petals.cli.run_dht` (relay service on, as stock) on a public lab host."""

    def __init__(self, lab: NetLab, host: Host, workdir: Path, name: str = "stock-bootstrap"):
        python = require_reference()
        self.log_path = Path(workdir) / f"{name}.log"
        argv = [
            str(python), str(reference_dir() / "lib" / "petalsref_launch.py"), "petals.cli.run_dht",
            "--host_maddrs", f"/ip4/0.0.0.0/tcp/{LAB_PORT}",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = lab.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, env=reference_env())
        match = _wait_log(self.log_path, rf"/ip4/{re.escape(host.ip)}/tcp/{LAB_PORT}/p2p/(\w+)", self.process, 90)
        self.maddr = match.group(0)
        self.peer_id = match.group(1)


def stock_server(
    lab: NetLab, host: Host, workdir: Path, model: Path, initial_peer: str | list[str], blocks: str, prefix: str,
    name: str,
) -> PetalsServer:  # fmt: skip
    """A stock Petals server with stock relay settings (auto-relay on) and its own reachability check."""
    peers = [initial_peer] if isinstance(initial_peer, str) else list(initial_peer)
    return PetalsServer(
        workdir,
        model,
        peers[0],
        blocks,
        prefix,
        name=name,
        launcher=lab.exec_argv(host.ns, []),
        # argparse keeps the last --initial_peers: all of them
        network_flags=["--host_maddrs", f"/ip4/0.0.0.0/tcp/{LAB_PORT}", "--initial_peers", *peers],
    )


def corolla_server(
    lab: NetLab,
    host: Host,
    workdir: Path,
    model: Path,
    *args: str,
    name: str,
    announce_port: int | None = None,
    listen_port: int = LAB_PORT,
    direct_link_port: int | None = None,
) -> CorollaServer:
    """`corolla serve` in a lab host, listening on all its interfaces at `listen_port` (or on loopback
    behind a delay forwarder at announce_port, which it then announces). `direct_link_port`: its direct
    links listen there (behind a forwarder of the same port on the host's address, when announce_port
    is set: direct_link.py advertises the announced host)."""
    if announce_port is None:
        flags = ["--port", str(listen_port)]
    else:
        flags = [
            "--host-maddrs", f"/ip4/127.0.0.1/tcp/{listen_port}",
            "--announce-maddrs", f"/ip4/{host.ip}/tcp/{announce_port}",
        ]  # fmt: skip
    if direct_link_port is not None:
        flags += ["--direct-link-port", str(direct_link_port)]
    return CorollaServer(
        workdir,
        model,
        *args,
        name=name,
        launcher=lab.exec_argv(host.ns, []),
        network_flags=flags,
    )


def python_in(lab: NetLab, host: Host) -> list[str]:
    return lab.exec_argv(host.ns, [sys.executable])


class CorollaBootstrap:
    """`python -m corolla.swarm.bootstrap` on a public lab host (relay service on, answers reachability checks)."""

    def __init__(self, lab: NetLab, host: Host, workdir: Path, name: str = "bootstrap", initial_peers: list[str] = ()):
        self.log_path = Path(workdir) / f"{name}.log"
        argv = [sys.executable, "-m", "corolla.swarm.bootstrap", "--port", str(LAB_PORT)]
        if initial_peers:
            argv += ["--initial-peers", *initial_peers]
        with open(self.log_path, "wb") as log:
            self.process = lab.popen(host, argv, stdout=log, stderr=subprocess.STDOUT)
        match = _wait_log(self.log_path, rf"/ip4/{re.escape(host.ip)}/tcp/{LAB_PORT}/p2p/(\w+)", self.process, 90)
        self.maddr = match.group(0)
        self.peer_id = match.group(1)

    def kill(self) -> None:
        """The machine dies: the peer, its DHT process and its p2pd, all at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        self.process.wait(10)


def public_relays(lab: NetLab, workdir: Path, initial_peer: str, count: int = 2) -> list[CorollaBootstrap]:
    """More public peers that relay (Corolla bootstraps on new public hosts relay-1, relay-2, ...).

    A stock Petals server behind NAT takes a relay only once libp2p's auto-relay knows four candidates,
    or after three minutes (go-libp2p's autorelay boot delay); the real swarm has dozens of public peers,
    a lab with a bootstrap and one public server has two."""
    return [
        CorollaBootstrap(lab, lab.add_public(f"relay{i}"), workdir, name=f"relay{i}", initial_peers=[initial_peer])
        for i in range(1, count + 1)
    ]


def lab_maddr(server: CorollaServer, host: Host) -> str:
    """The server's address on the lab internet (not its loopback one)."""
    stats = server.wait_state("online")
    return next(m for m in stats["visible_maddrs"] if f"/{host.ip}/" in m)


def run_corolla_client(
    lab: NetLab, host: Host, model: Path, prefix: str, initial_peers: list[str], new_tokens: int = 64
) -> dict:
    """lab_client.py in `host`: greedy generation through the swarm, checked token by token."""
    script = Path(__file__).with_name("lab_client.py")
    argv = [sys.executable, str(script), str(model), prefix, *initial_peers, "--new-tokens", str(new_tokens)]
    result = lab.run(host, argv, timeout=400)
    lines = [line for line in result.stdout.splitlines() if line.startswith(('{"exact"', '{"error"'))]
    if not lines:
        raise ProcessFailed(f"the lab client printed no report:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    report = json.loads(lines[-1])
    report["stderr_tail"] = result.stderr[-3000:]
    return report


class LabNode:
    """`corolla node` (the window's backend) in a lab host. Its API listens on that host's loopback, so
    every request is made from inside the host's namespace."""

    def __init__(self, lab: NetLab, host: Host, home: Path, extra_env: dict[str, str] | None = None):
        self.lab, self.host, self.home = lab, host, Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home / "node.log"
        env = {**os.environ, "COROLLA_HOME": str(self.home), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        with open(self.log_path, "ab") as log:
            self.process = lab.popen(host, [sys.executable, "-m", "corolla.cli", "node"], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)  # fmt: skip
        lock = self.home / "config" / "node.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                data = json.loads(lock.read_text())
                if data["pid"] == self.process.pid:
                    self.url, self.token = data["url"], Path(data["token_file"]).read_text().strip()
                    self.request("GET", "/api/ping")
                    return
            except (FileNotFoundError, json.JSONDecodeError, KeyError, ProcessFailed):
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        raise ProcessFailed(f"the node did not start in {host.name}:\n{self.log_path.read_text()[-3000:]}")

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 120.0):
        """The JSON body of a call through the node's API; ProcessFailed on an error status."""
        status, reply = self.call(method, path, body, timeout)
        if status >= 400:
            raise ProcessFailed(f"{method} {path}: HTTP {status} {reply}")
        return reply

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, object]:
        """(HTTP status, JSON body) without raising on an error status: the error bodies are tested too."""
        code = (
            "import httpx, json, sys\n"
            "url, token, method, path, body, timeout = json.loads(sys.argv[1])\n"
            "r = httpx.request(method, url + path, json=body, timeout=timeout,"
            " headers={'Authorization': 'Bearer ' + token})\n"
            "print(json.dumps({'status': r.status_code, 'body': r.json()}))\n"
        )
        args = json.dumps([self.url, self.token, method, path, body, timeout])
        result = self.lab.run(self.host, [sys.executable, "-c", code, args], timeout=timeout + 30)
        if result.returncode != 0:
            raise ProcessFailed(f"{method} {path} failed: {result.stderr[-2000:]}")
        reply = json.loads(result.stdout.strip().splitlines()[-1])
        return reply["status"], reply["body"]

    def chat(self, prompt: str, max_new_tokens: int = 8, timeout: float = 300.0, privacy: dict | None = None) -> dict:
        """A new chat (with `privacy`: who may read it) and one reply through the node's API, as the window
        sends it: the reply's text, its end event, and the seconds to the first token and to the end."""
        code = (
            "import httpx, json, sys, time\n"
            "url, token, prompt, n, timeout, privacy = json.loads(sys.argv[1])\n"
            "h = {'Authorization': 'Bearer ' + token}\n"
            "t0 = time.monotonic(); first = None; text = []; end = None\n"
            "chat = httpx.post(url + '/api/chats', json={'title': 'lab', 'privacy': privacy}, headers=h,"
            " timeout=60).json()\n"
            "body = {'content': prompt, 'max_new_tokens': n}\n"
            "with httpx.stream('POST', url + '/api/chats/' + chat['id'] + '/messages', json=body, headers=h,"
            " timeout=timeout) as r:\n"
            "    for line in r.iter_lines():\n"
            "        if not line.startswith('data:'): continue\n"
            "        event = json.loads(line[5:])\n"
            "        if event['type'] == 'token':\n"
            "            first = first or time.monotonic() - t0; text.append(event['text'])\n"
            "        elif event['type'] in ('done', 'error'): end = event\n"
            "print(json.dumps({'text': ''.join(text), 'end': end, 'first_token_s': first,"
            " 'total_s': time.monotonic() - t0}))\n"
        )
        args = json.dumps([self.url, self.token, prompt, max_new_tokens, timeout, privacy])
        result = self.lab.run(self.host, [sys.executable, "-c", code, args], timeout=timeout + 60)
        if result.returncode != 0:
            raise ProcessFailed(f"the chat failed in {self.host.name}: {result.stderr[-2000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_status(self, predicate, timeout: float = 300.0, what: str = "the expected status") -> dict:
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = self.request("GET", "/api/status")
            if predicate(status):
                return status
            if self.process.poll() is not None:
                break
            time.sleep(1.0)
        tail = self.log_path.read_text()[-3000:]
        raise ProcessFailed(f"{self.host.name}: no {what} within {timeout} s: {status}\n{tail}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessFailed):
            self.request("POST", "/api/shutdown", timeout=20)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
