"""Real swarm processes for tests: Corolla block servers and stock Petals 2.2 peers, on 127.0.0.1 only.

Every peer runs with NAT port mapping off, relays off and loopback addresses; each process gets its
own process group, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]  # app/corolla/testing/swarm.py: the repository
# The DHT prefix of the session's shared tiny swarm (tests/conftest.py: `tiny_swarm`).
TINY_SWARM_PREFIX = "tiny-swarm"
LOOPBACK_FLAGS = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--no-relay", "--no-auto-nat"]


class ProcessFailed(AssertionError):
    pass


class CorollaServer:
    """`corolla serve` in a subprocess; its state comes from the stats file it writes every second."""

    def __init__(
        self,
        workdir: Path,
        model: str | Path,
        *args: str,
        name: str = "server",
        launcher: list[str] = (),
        network_flags: list[str] = LOOPBACK_FLAGS,
        num_threads: int | None = 1,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stats_path = self.workdir / f"{name}.stats.json"
        self.log_path = self.workdir / f"{name}.log"
        self.stats_path.unlink(missing_ok=True)
        command = [
            *launcher,  # e.g. `ip netns exec HOST` for the network lab
            sys.executable,
            "-m",
            "corolla.cli",
            "serve",
            str(model),
            *network_flags,
            "--stats-file",
            str(self.stats_path),
            # One torch thread unless asked (None: the server's own default, as a user runs it).
            *(["--num-threads", str(num_threads)] if num_threads else []),
            *args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def stats(self) -> dict:
        try:
            return json.loads(self.stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def wait_state(self, state: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.stats()
            if stats.get("state") == state:
                return stats
            if self.process.poll() is not None:
                raise ProcessFailed(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise ProcessFailed(f"server did not reach state {state!r} in {timeout} s:\n{self.log_tail()}")

    @property
    def maddr(self) -> str:
        return self.wait_state("online")["visible_maddrs"][0]

    @property
    def peer_id(self) -> str:
        return self.stats()["peer_id"]

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (the server announces OFFLINE), then SIGKILL if it lingers."""
        return _stop_group(self.process, signal.SIGTERM, timeout)

    def kill(self) -> None:
        _stop_group(self.process, signal.SIGKILL, 10.0)


@contextlib.contextmanager
def tiny_block_server(
    workdir: Path,
    model: str | Path,
    prefix: str,
    blocks: int,
    *extra: str,
    inference_max_length: int = 64,
    cache_tokens: int | None = None,
    step_timeout: float | None = None,
    update_period: float | None = None,
) -> Iterator[CorollaServer]:
    """A one-server swarm serving blocks 0..`blocks` of a tiny model in float32, online, stopped on
    exit: the server the wire-level tests and benchmarks drive directly (`extra`: more serve flags;
    the options left None keep the server's defaults)."""
    options = {"--attn-cache-tokens": cache_tokens, "--step-timeout": step_timeout, "--update-period": update_period}
    flags = [str(part) for flag, value in options.items() if value is not None for part in (flag, value)]
    server = CorollaServer(
        workdir,
        model,
        "--new-swarm",
        "--dht-prefix",
        prefix,
        "--blocks",
        f"0:{blocks}",
        "--torch-dtype",
        "float32",
        "--throughput",
        "25",
        "--inference-max-length",
        str(inference_max_length),
        "--max-batch-size",
        "256",
        *flags,
        *extra,
    )
    try:
        server.wait_state("online")
        yield server
    finally:
        server.stop()


def route_first_through(model, peer: str) -> None:
    """Make `peer` the client's closest server, so its routes go through it first (e.g. a liar's best
    case in the spot-check tests and benchmark)."""
    model._loop.run(model.view.refresh())
    for other in model.view.rtts:
        model.view.rtts[other] = 0.5
    model.view.rtts[peer] = 0.0001


def _stop_group(process: subprocess.Popen, sig: int, timeout: float) -> int:
    """Signal the main process only (its hivemind children must live until it has said goodbye on the
    DHT); then SIGKILL whatever is left of its process group, so no child outlives the test."""
    if process.poll() is None:
        try:
            if sig == signal.SIGKILL:
                os.killpg(process.pid, sig)
            else:
                os.kill(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # forked children (hivemind's DHT, p2pd) of a finished process
    return process.returncode


# --- the stock Petals 2.2 reference environment ---------------------------------------------------


def reference_dir() -> Path:
    return Path(os.environ.get("COROLLA_PETALSREF_SRC", REPO.parent / "shared" / "reference-petals"))


def reference_python() -> Path:
    root = Path(
        os.environ.get(
            "PETALSREF", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corolla-petalsref"
        )
    )
    return root / "venv" / "bin" / "python"


def require_reference() -> Path:
    """The reference venv's python; skips where it was not built (CI builds it, so CI never skips)."""
    python = reference_python()
    if not python.exists() or not reference_dir().exists():
        if os.environ.get("CI"):
            raise ProcessFailed(f"the Petals reference environment is missing ({python}); run build_env.sh")
        pytest.skip("the stock Petals reference environment is not built (shared/reference-petals/build_env.sh)")
    return python


def reference_env() -> dict[str, str]:
    lib = str(reference_dir() / "lib")
    return {
        **os.environ,
        "PYTHONPATH": lib,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }


class PetalsServer:
    """A stock Petals 2.2 server (NAT port mapping forced off by the reference harness)."""

    def __init__(
        self,
        workdir: Path,
        model_dir: Path,
        initial_peer: str,
        blocks: str,
        dht_prefix: str,
        name: str = "petals-server",
        launcher: list[str] = (),
        network_flags: list[str] = ("--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--no_auto_relay"),
        env: dict[str, str] | None = None,
    ):
        python = require_reference()
        self.log_path = Path(workdir) / f"{name}.log"
        command = [
            *launcher,  # e.g. `ip netns exec HOST` for the network lab
            str(python),
            str(reference_dir() / "lib" / "petalsref_launch.py"),
            "petals.cli.run_server",
            str(model_dir),
            "--initial_peers",
            initial_peer,
            *network_flags,
            "--dht_prefix",
            dht_prefix,
            "--device",
            "cpu",
            "--torch_dtype",
            "float32",
            "--quant_type",
            "none",
            "--block_indices",
            blocks,
            "--throughput",
            "1.0",
            "--skip_reachability_check",
            "--cache_dir",
            str(Path(workdir) / f"{name}-cache"),
            "--num_handlers",
            "2",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env or reference_env()
            )

    def wait_started(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "[INFO] Started" in self.log_path.read_text(errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        raise ProcessFailed(f"stock Petals server did not start:\n{tail}")

    def stop(self) -> None:
        _stop_group(self.process, signal.SIGTERM, 20)


def run_reference_script(
    script: Path, *args: str, timeout: float = 300.0, launcher: list[str] = ()
) -> subprocess.CompletedProcess:
    python = require_reference()
    # Its own process group: a stock client forks its DHT process (same command line), which outlives a
    # killed parent, so a timeout takes the whole group down, not just the script.
    process = subprocess.Popen(
        [*launcher, str(python), str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=reference_env(),
        cwd=str(reference_dir()),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(process.args, timeout, stdout, stderr) from timed_out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever it forked and left behind
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def make_reference_model(out_dir: Path, dht_prefix: str, layers: int | None = None) -> Path:
    """The reference harness's tiny Llama (written by transformers 4.34, as stock peers expect)."""
    if not (out_dir / "config.json").exists():
        result = run_reference_script(
            reference_dir() / "make_tiny_llama.py", str(out_dir), "--dht_prefix", dht_prefix, "--seed", "0"
        )
        if result.returncode != 0:
            raise ProcessFailed(result.stderr[-3000:])
    return out_dir


class StatsGrowth:
    """How much each server's stats counters grew since this was made. The stats files are rewritten
    every second, so a test waits (`wait_until`) for all of them to show what it expects."""

    def __init__(self, servers: list[CorollaServer]):
        self.servers = servers
        self.before = [server.stats() for server in servers]
        self.after = self.before

    def __call__(self, key: str) -> list[int]:
        return [a.get(key, 0) - b.get(key, 0) for a, b in zip(self.after, self.before, strict=True)]

    def wait_until(self, ready: Callable[[StatsGrowth], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.after = [server.stats() for server in self.servers]
            if ready(self) or time.monotonic() > deadline:
                return
            time.sleep(0.5)


def generate_pushing_every_hop(remote, ids, max_new_tokens: int):
    """Greedy, a token a step, with server-to-server push on every hop (whatever the route would choose)."""
    remote.client_config.use_server_to_server = True
    try:
        return remote.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, prompt_lookup_num_tokens=None)
    finally:
        remote.client_config.use_server_to_server = None


def start_chain(
    workdir: Path, model: str | Path, spans: list[str], *extra: str, name: str = "server"
) -> list[CorollaServer]:
    """Corolla servers for `spans` ("A:B" each): the first starts a swarm, the others join it; all online."""
    servers: list[CorollaServer] = []
    try:
        for i, blocks in enumerate(spans):
            join = ["--new-swarm"] if i == 0 else ["--initial-peers", servers[0].maddr]
            servers.append(
                CorollaServer(
                    workdir,
                    model,
                    *join,
                    "--blocks",
                    blocks,
                    "--torch-dtype",
                    "float32",
                    "--throughput",
                    "10",
                    *extra,
                    name=f"{name}-{i}",
                )
            )
        for server in servers:
            server.wait_state("online")
        return servers
    except BaseException:
        for server in servers:
            server.stop()
        raise
