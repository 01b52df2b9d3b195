"""The node itself: its state, settings, background work and the process around the API server. Its
methods for the block server are in contribution.py, for the swarm client in swarm_link.py, its reports in
status.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from corolla.api import models as m
from corolla.node.chats import ChatService, SwarmClientHost
from corolla.node.contribution import ContributionMixin
from corolla.node.db import Database
from corolla.node.default_model import DefaultModel
from corolla.node.instance import NODE_PID_ENV, AlreadyRunning, claim, new_token, read_address, release
from corolla.node.lan_discovery import LanDiscovery, default_human_name, lan_maddrs
from corolla.node.paths import NodePaths
from corolla.node.secrets import SecretStore
from corolla.node.settings import Settings
from corolla.node.sharing import SwarmAddress
from corolla.node.status import StatusMixin
from corolla.node.supervisor import ServerSupervisor
from corolla.node.swarm_link import SwarmLinkMixin
from corolla.swarm.server.stats import ServerStats, read_stats

logger = logging.getLogger(__name__)
NODE_SHUTDOWN_DEADLINE_S = 40.0  # the block server gets 20 s to leave the swarm, the rest is slack
SERVER_FIELDS = (
    "swarm",
    "custom_peers",
    "model",
    "dht_prefix",
    "blocks",
    "num_blocks",
    "torch_dtype",
    "quant_type",
    "device",
    "memory_cap_gib",
    "public_name",
    "listen_on_lan",
    "cpu_percent",
    "swarm_port",
    "nat_port_map",
    "public_address",
)


class NodeService(ContributionMixin, SwarmLinkMixin, StatusMixin):
    """The node: its state and background work; contribution.py, swarm_link.py and status.py hold the
    rest of its methods."""

    def __init__(self, paths: NodePaths):
        self.paths = paths.ensure()
        self.db = Database(paths.database)
        self.secrets = SecretStore()
        stored = self.db.load_settings().get("settings")
        try:
            self.settings = Settings(**stored) if stored else Settings()
        except Exception:
            logger.warning("stored settings are invalid; using defaults")
            self.settings = Settings()
        self.supervisor = ServerSupervisor(paths.server_dir)
        self.supervisor.args_for_restart = self._args_for_restart
        self._restarting_server = False
        self.default_model = DefaultModel(paths.cache_dir, paths.data_dir)
        self.token = new_token(paths)
        self.started_at = time.time()
        self.chats = ChatService(self.db, SwarmClientHost(self._client_target, lambda: self.secrets.get("hf_token")))
        self.chats.clients.on_new_client = self._restore_flagged_servers
        self.chats.privacy_for = self.privacy_for
        self.chats.engine.address = self.supervisor.chat_engine
        self.chats.engine.context = self.engine_context
        self.chats.engine.on_note = self.record_engine_note
        self._last_stats: ServerStats | None = None
        self._paused_by_policy = False
        self._pause_rule: m.PauseRule | None = None
        # The window starts the node on first run with this set: nothing is served for the swarm until
        # the user agrees in the first-run dialog (which then starts contribution, or switches it off).
        self.awaiting_consent = os.environ.get("COROLLA_AWAIT_CONSENT") == "1"
        self._shutdown = asyncio.Event()
        self.lan: LanDiscovery | None = None  # exists only while the user has discovery switched on
        self._lan_retry_at = 0.0
        self.address = SwarmAddress(paths.config_dir / "swarm-identity.key")
        if self.settings.swarm_port is None:  # chosen once, on the first start: the window can name it at once
            port = self.address.port_for(None, loopback_only=False, our_server_holds_it=False)
            self.settings = self.settings.model_copy(update={"swarm_port": port})
            self._save_settings()

    # --- the block server ---------------------------------------------------------------------------

    def _args_for_restart(self) -> list[str] | None:
        """A server that stopped to take a relay again starts with what the node learned meanwhile (the
        members others can dial, as initial peers and relays); None keeps its arguments."""
        stats = read_stats(self.supervisor.stats_path)
        if stats is not None:
            self.learn_members(stats)
        self._restarting_server = True  # its port is ours still (p2pd may take a moment to let it go)
        try:
            return self.server_args()
        except Exception:  # e.g. the model's plan cannot be read now: the same arguments as before
            logger.warning("could not rebuild the block server's arguments", exc_info=True)
            return None
        finally:
            self._restarting_server = False

    # --- settings ----------------------------------------------------------------------------------
    def _save_settings(self) -> None:
        self.db.save_settings({"settings": self.settings.model_dump()})

    def apply_settings(self, settings: Settings) -> None:
        old, self.settings = self.settings, settings
        self._save_settings()
        if self.awaiting_consent:
            return  # saved; the first-run dialog starts contribution itself once the user agrees
        server_changed = any(getattr(old, f) != getattr(settings, f) for f in SERVER_FIELDS)
        if server_changed:
            self.chats.clients.close()
            if self.supervisor.wanted:
                self.supervisor.start(self.server_args())
        if settings.contribute and not old.contribute:
            self.contribution("start")
        elif not settings.contribute and old.contribute:
            self.supervisor.stop("contribution switched off")

    # --- the swarm client --------------------------------------------------------------------------

    # --- privacy: who may receive a chat's hidden states ----------------------------------------------

    # --- background work ---------------------------------------------------------------------------
    def tick(self) -> None:
        status = self.supervisor.poll()
        self._record_stats(status.stats)
        if status.stats is not None:
            self.learn_members(status.stats)
        self.sync_lan(status.state, status.stats)

    # --- swarms on this network --------------------------------------------------------------------
    def lan_announcement_blocker(self, state: str, stats: ServerStats | None) -> str | None:
        """Why this computer's swarm is not announced on the LAN now (None: it is)."""
        s = self.settings
        if not s.lan_discovery:
            return "discovery is switched off"
        if s.swarm == "public":
            return "discovery is off on the public swarm"
        if s.swarm != "private":
            return "only a private swarm hosted here is announced"
        if not s.listen_on_lan:
            return "the private swarm listens on this computer only (switch on: listen on the local network)"
        if state != "online" or stats is None or not lan_maddrs(stats.visible_maddrs):
            return "the private swarm is not online yet"
        return None

    def sync_lan(self, state: str, stats: ServerStats | None) -> None:
        """Start, update or stop discovery to match the settings (each tick, from a worker thread).
        Never on the public swarm: there is nothing on the LAN to find or announce for it."""
        if not self.settings.lan_discovery or self.settings.swarm == "public":
            if self.lan is not None:
                self.lan.close()
                self.lan = None
            return
        if self.lan is None:
            if time.monotonic() < self._lan_retry_at:
                return
            try:
                self.lan = LanDiscovery()
            except Exception as exc:  # no multicast-capable network here: try again later
                logger.warning("LAN discovery cannot start: %s", exc)
                self._lan_retry_at = time.monotonic() + 30
                return
        if self.lan_announcement_blocker(state, stats) is None:
            name = self.settings.public_name or default_human_name()
            try:
                self.lan.announce(name, self.model_display_name(), self.dht_prefix() or "", stats.visible_maddrs)
            except Exception:
                logger.warning("could not announce the swarm on the LAN", exc_info=True)
        else:
            self.lan.withdraw()

    def lan_swarms(self) -> dict:
        sup = self.supervisor.poll()
        lan = self.lan
        return {
            "enabled": self.settings.lan_discovery and self.settings.swarm != "public",
            "announcing": bool(lan and lan.announcing),
            "not_announced_because": self.lan_announcement_blocker(sup.state, sup.stats),
            "swarms": [swarm.to_dict() for swarm in lan.swarms()] if lan else [],
        }

    def request_shutdown(self) -> None:
        loop = self._loop
        loop.call_soon_threadsafe(self._shutdown.set)

    async def run_background(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.awaiting_consent:
            self.supervisor.reason = "waiting for you to agree in the window"
        elif self.settings.contribute:
            await asyncio.to_thread(self.contribution, "start")
        ticks = 0
        while not self._shutdown.is_set():
            await asyncio.to_thread(self.tick)
            if ticks % 10 == 0:
                await asyncio.to_thread(self.policy_tick)
            ticks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shutdown.wait(), 1.0)

    def close(self) -> None:
        if self.lan is not None:
            self.lan.close()  # says goodbye on the LAN: neighbours drop this swarm from their lists
            self.lan = None
        self.chats.clients.close()
        self.supervisor.close()
        self.db.close()


def run_node(port: int = 0, paths: NodePaths | None = None) -> int:
    import uvicorn

    from corolla.node.api import create_app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = (paths or NodePaths.default()).ensure()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    previous = read_address(paths)  # still there after the claim: that node never released it
    try:
        claim(paths, url)
    except AlreadyRunning as exc:
        sock.close()
        print(f"corolla: {exc}; its token is in {exc.address.token_file}", file=sys.stderr)
        return 1
    os.environ[NODE_PID_ENV] = str(os.getpid())  # inherited by p2pd and the server: orphans are found
    node = NodeService(paths)
    if previous is not None and previous.pid != os.getpid() and node.supervisor.last_failure is None:
        started = time.strftime("%d %b %H:%M", time.localtime(previous.started_at))
        node.supervisor.last_failure = (
            f"The previous node (started {started}) ended without shutting down: it was killed or it crashed."
        )
        logger.warning("the previous node (pid %d) ended without shutting down", previous.pid)
    app = create_app(node)

    # Open streams (a chat reply, a window's polling) get a few seconds to finish, then are closed.
    class NodeHTTPServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # The node handles SIGINT/SIGTERM itself (a second one forces the exit); uvicorn's own
            # handlers would re-raise the signal after serving and end the process before cleanup.
            yield

    server = NodeHTTPServer(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    print(f"corolla node: API on {url} (token in {paths.token_file})", flush=True)

    def on_signal(sig: int) -> None:
        if node._shutdown.is_set():
            logger.warning("%s again: stopping now", signal.Signals(sig).name)
            _force_exit(node, paths, 128 + sig)
        logger.info("%s: stopping the node (again to force)", signal.Signals(sig).name)
        node._shutdown.set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        background = asyncio.create_task(node.run_background())
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        stop = asyncio.create_task(node._shutdown.wait())
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
        # Leaving is bounded: whatever hangs (a swarm call holding a thread), the node is gone by then.
        deadline = threading.Timer(NODE_SHUTDOWN_DEADLINE_S, _force_exit, args=(node, paths, 1))
        deadline.daemon = True
        deadline.start()
        node._shutdown.set()
        server.should_exit = True
        await asyncio.gather(serving, background, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        node.close()
        release(paths)
        Path(paths.token_file).unlink(missing_ok=True)
    return 0


def _force_exit(node: NodeService, paths: NodePaths, code: int) -> None:
    """A second signal, or a shutdown that overran its deadline: kill the block server's processes and go."""
    with contextlib.suppress(Exception):
        node.supervisor.kill_now()
    with contextlib.suppress(Exception):
        release(paths)
        Path(paths.token_file).unlink(missing_ok=True)
    logging.shutdown()
    os._exit(code)
