"""The node itself: settings, the block server child, the swarm client, stats history, the API server."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
from fastapi import HTTPException

from corolla import __version__
from corolla.node import api_models as m
from corolla.node.chats import ChatService, ClientTarget, NoSwarm, SwarmClientHost
from corolla.node.db import Database
from corolla.node.default_model import DefaultModel
from corolla.node.instance import AlreadyRunning, claim, new_token, release
from corolla.node.paths import NodePaths
from corolla.node.secrets import SecretStore
from corolla.node.settings import PUBLIC_INITIAL_PEERS, Settings, contribution_allowed, make_invite
from corolla.node.supervisor import ServerSupervisor

logger = logging.getLogger(__name__)
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
)


class NodeService:
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
        self.default_model = DefaultModel(paths.cache_dir, paths.data_dir)
        self.token = new_token(paths)
        self.started_at = time.time()
        self.chats = ChatService(self.db, SwarmClientHost(self._client_target, lambda: self.secrets.get("hf_token")))
        self._last_stats: dict | None = None
        self._paused_by_policy = False
        self._shutdown = asyncio.Event()

    # --- the model ---------------------------------------------------------------------------------
    @property
    def is_demo(self) -> bool:
        return self.settings.model is None

    def model_path(self) -> str:
        """The model folder or repo id; the default model is converted on first use (about a minute)."""
        if not self.is_demo:
            return self.settings.model
        return str(self.default_model.folder())

    def model_display_name(self) -> str:
        return self.default_model.name if self.is_demo else self.settings.model

    def model_id(self) -> str:
        return self.default_model.dht_prefix if self.is_demo else self.settings.model

    def dht_prefix(self) -> str | None:
        return self.settings.dht_prefix or (self.default_model.dht_prefix if self.is_demo else None)

    # --- the block server ---------------------------------------------------------------------------
    def server_args(self) -> list[str]:
        s = self.settings
        args = [self.model_path()]
        if s.swarm == "private":
            args.append("--new-swarm")
            if s.listen_on_lan:
                args += ["--host-maddrs", "/ip4/0.0.0.0/tcp/0"]
            else:
                args += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--no-relay", "--no-auto-nat"]
        else:
            args += ["--initial-peers", *(PUBLIC_INITIAL_PEERS if s.swarm == "public" else s.custom_peers)]
        if self.dht_prefix():
            args += ["--dht-prefix", self.dht_prefix()]
        if s.blocks:
            args += ["--blocks", s.blocks]
        elif s.num_blocks:
            args += ["--num-blocks", str(s.num_blocks)]
        elif self.is_demo:
            args += ["--blocks", f"0:{self.default_model.num_blocks()}"]
        elif s.memory_cap_gib:
            plan = self.plan(self.settings.model, s.torch_dtype, s.quant_type)
            args += ["--num-blocks", str(max(1, plan["recommended_blocks"]))]
        args += [
            "--torch-dtype",
            s.torch_dtype,
            "--quant-type",
            s.quant_type,
            "--device",
            s.device,
            "--throughput-cache",
            str(self.paths.cache_dir / "throughput.json"),
        ]
        if s.public_name:
            args += ["--public-name", s.public_name]
        return args

    def _server_args_preparing_the_model(self) -> list[str]:
        """server_args(), saying in the status while the default model is converted (first start)."""
        if self.is_demo and not self.default_model.is_ready():
            self.supervisor.state = "starting"
            self.supervisor.reason = f"preparing {self.default_model.name} (first start: converting it, about a minute)"
        return self.server_args()

    def _server_env_token(self) -> None:
        token = self.secrets.get("hf_token")
        if token:
            os.environ["HF_TOKEN"] = token  # inherited by the child, never on its command line

    def contribution(self, action: str) -> m.ActionResult:
        if action == "start":
            self.settings = self.settings.model_copy(update={"contribute": True})
            self._save_settings()
            self._server_env_token()
            try:
                args = self._server_args_preparing_the_model()
            except Exception as exc:  # the default model could not be converted (disk full, damaged file)
                logger.error("the model could not be prepared: %s", exc)
                self.supervisor.state, self.supervisor.reason = "failed", f"the model could not be prepared: {exc}"
                return m.ActionResult(ok=False, message=self.supervisor.reason)
            self.supervisor.start(args)
            self._paused_by_policy = False
            return m.ActionResult(ok=True, message="starting the block server")
        if action == "stop":
            self.settings = self.settings.model_copy(update={"contribute": False})
            self._save_settings()
            self.supervisor.stop()
            return m.ActionResult(ok=True, message="stopped")
        if action == "pause":
            self.supervisor.pause("paused by the user")
            return m.ActionResult(ok=True, message="paused")
        if self.supervisor.args is None:
            return self.contribution("start")
        self.supervisor.resume()
        return m.ActionResult(ok=True, message="resuming")

    # --- settings ----------------------------------------------------------------------------------
    def _save_settings(self) -> None:
        self.db.save_settings({"settings": self.settings.model_dump()})

    def apply_settings(self, settings: Settings) -> None:
        old, self.settings = self.settings, settings
        self._save_settings()
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
    def _client_target(self) -> ClientTarget:
        s = self.settings
        if s.swarm == "private":
            stats = self.supervisor.poll().stats or {}
            peers = tuple(stats.get("visible_maddrs") or ()) if stats.get("state") == "online" else ()
            return ClientTarget(self.model_path(), self.dht_prefix(), peers, loopback_only=not s.listen_on_lan)
        peers = tuple(PUBLIC_INITIAL_PEERS if s.swarm == "public" else s.custom_peers)
        return ClientTarget(self.model_path(), self.dht_prefix(), peers, loopback_only=False)

    def call_swarm(self, fn, *args):
        """Run a swarm call; swarm-side failures become 503 errors that say what to do."""
        from corolla.swarm.client.routing import MissingBlocksError
        from corolla.swarm.client.session import ServerFailure
        from corolla.swarm.models.errors import EngineError

        try:
            return fn(*args)
        except NoSwarm as exc:  # the node's own state: contribution is off in a private swarm
            raise HTTPException(409, str(exc)) from exc
        except EngineError as exc:  # a model that cannot be opened or is not supported
            raise HTTPException(400, str(exc)) from exc
        except (MissingBlocksError, ServerFailure) as exc:  # the swarm, not this request, is at fault
            raise HTTPException(503, str(exc)) from exc

    def swarm_health(self) -> list[dict]:
        from corolla.swarm.client.health import read_swarm_health

        model = self.call_swarm(self.chats.clients.get)
        extra = {model.dht_prefix: model.view.num_blocks}
        models = model._loop.run(read_swarm_health(model.dht, model.view.p2p, extra), timeout=60)
        own = (self.supervisor.poll().stats or {}).get("peer_id")
        result = []
        for health in models:
            data = health.to_dict()
            for server in data["servers"]:
                server["this_computer"] = server["peer_id"] == own
            result.append(data)
        return result

    # --- status, hardware --------------------------------------------------------------------------
    def status(self) -> m.NodeStatus:
        sup = self.supervisor.poll()
        stats = sup.stats or {}
        contribution = m.ContributionStatus(
            state=sup.state,
            reason=sup.reason,
            restarts=sup.restarts,
            last_failure=sup.last_failure,
            pid=sup.pid,
            start_block=stats.get("start_block"),
            end_block=stats.get("end_block"),
            throughput=stats.get("throughput"),
            tokens_served=stats.get("tokens_processed", 0),
            inference_steps=stats.get("inference_steps", 0),
            sessions_active=stats.get("sessions_active", 0),
            sessions_opened=stats.get("sessions_opened", 0),
            cache_bytes_total=stats.get("cache_bytes_total", 0),
            cache_bytes_left=stats.get("cache_bytes_left", 0),
            uptime_s=stats.get("uptime_s", 0.0),
            peer_id=stats.get("peer_id"),
        )
        invite = None
        if self.settings.swarm == "private" and stats.get("visible_maddrs") and sup.state == "online":
            invite = make_invite(stats["visible_maddrs"], self.dht_prefix() or "", self.model_id())
        return m.NodeStatus(
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            model=self.model_display_name(),
            model_is_demo=self.is_demo,
            model_card=m.ModelCard(**self.default_model.card().to_dict()) if self.is_demo else None,
            model_preparing=self.default_model.preparing,
            swarm=self.settings.swarm,
            contribution=contribution,
            secrets_storage=self.secrets.storage,
            invite=invite,
            interrupted_replies_recovered=self.db.interrupted_on_start,
        )

    def plan(self, model: str | None, torch_dtype: str, quant_type: str) -> dict:
        from corolla.node.hardware import detect, plan_blocks

        report = detect()
        best = next((a for a in report.accelerators if a.kind == "cuda"), report.accelerators[-1])
        cap = int(self.settings.memory_cap_gib * 2**30) if self.settings.memory_cap_gib else None
        return plan_blocks(
            model or self.model_path(),
            best.kind,
            best.free_bytes,
            torch_dtype,
            quant_type,
            cap,
            token=self.secrets.get("hf_token"),
        ).to_dict()

    def hardware(self, model: str | None, torch_dtype: str, quant_type: str) -> dict:
        from corolla.node.hardware import detect

        report = detect().to_dict()
        report["plan"] = self.call_swarm(self.plan, model, torch_dtype, quant_type)
        return report

    # --- background work ---------------------------------------------------------------------------
    def tick(self) -> None:
        status = self.supervisor.poll()
        self._record_stats(status.stats)

    def policy_tick(self) -> None:
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        on_battery = battery is not None and not battery.power_plugged
        busy = psutil.cpu_percent(interval=None)
        pid = self.supervisor.process.pid if self.supervisor.process else None
        if pid:
            with contextlib.suppress(psutil.Error):
                busy -= psutil.Process(pid).cpu_percent(interval=None) / (psutil.cpu_count() or 1)
        allowed, reason = contribution_allowed(self.settings, dt.datetime.now(), busy, on_battery)
        if not self.settings.contribute:
            return
        if not allowed and self.supervisor.wanted:
            self.supervisor.pause(reason)
            self._paused_by_policy = True
        elif allowed and self._paused_by_policy:
            self._paused_by_policy = False
            self.supervisor.resume()

    def _record_stats(self, stats: dict | None) -> None:
        if not stats or stats.get("state") != "online":
            self._last_stats = None if not stats else self._last_stats
            return
        last = self._last_stats
        if last is not None and last.get("started_at") == stats.get("started_at"):

            def delta(key):
                return max(stats.get(key, 0) - last.get(key, 0), 0)

            uptime = max(stats.get("uptime_s", 0) - last.get("uptime_s", 0), 0)
            if any((delta("tokens_processed"), delta("sessions_opened"), delta("inference_steps"), uptime)):
                self.db.add_contribution(
                    int(time.time() // 3600),
                    delta("tokens_processed"),
                    delta("sessions_opened"),
                    delta("inference_steps"),
                    uptime,
                )
        self._last_stats = stats

    def _shutdown_requested(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._shutdown.set)

    def request_shutdown(self) -> None:
        loop = self._loop
        loop.call_soon_threadsafe(self._shutdown.set)

    async def run_background(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.settings.contribute:
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
    try:
        claim(paths, url)
    except AlreadyRunning as exc:
        sock.close()
        print(f"corolla: {exc}; its token is in {exc.address.token_file}", file=sys.stderr)
        return 1
    node = NodeService(paths)
    app = create_app(node)
    # Open streams (a chat reply, a window's polling) get a few seconds to finish, then are closed.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    # uvicorn re-raises the signal it caught once it has stopped serving; with the default handler that
    # would end the process before the block server is stopped. Ours only asks for the shutdown.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node._shutdown_requested())
    print(f"corolla node: API on {url} (token in {paths.token_file})", flush=True)

    async def main() -> None:
        background = asyncio.create_task(node.run_background())
        serving = asyncio.create_task(server.serve(sockets=[sock]))  # uvicorn handles SIGTERM/SIGINT itself
        stop = asyncio.create_task(node._shutdown.wait())
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
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
