"""The node's contribution: which model it serves, the block server child's arguments, starting,
pausing and stopping it (by hand or by the user's rules), and the stats history it leaves."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from pathlib import Path

import psutil

from corolla.api import models as m
from corolla.node.lan_discovery import default_human_name
from corolla.node.settings import PEER_ID, PUBLIC_INITIAL_PEERS, Settings, contribution_allowed
from corolla.node.sharing import lan_addresses
from corolla.swarm.server.stats import ServerStats

logger = logging.getLogger(__name__)
MAX_LEARNED_PEERS = 32


def cpu_threads(percent: int, cores: int | None = None) -> int:
    """The block server's compute threads for a share of the processor: 50 % of 8 cores -> 4."""
    cores = cores or os.cpu_count() or 1
    return max(1, round(cores * percent / 100))


class ContributionMixin:
    """The model and the block server for NodeService (service.py): uses its `settings`, `paths`,
    `supervisor`, `default_model`, `secrets`, `db`, `address` and `chats`."""

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

    def model_setting_for(self, announced: str) -> str | None:
        """The `model` setting that serves the model a swarm names in its invite or LAN announcement:
        None for the built-in model (named by its display name or its id), else the name as given (a
        repo id, or a folder that exists here). A folder on the neighbour's computer cannot be served
        from here: ValueError with what to do."""
        if announced in (self.default_model.name, self.default_model.dht_prefix):
            return None
        looks_like_path = announced.startswith(("/", "~", ".")) or "\\" in announced or announced[1:3] == ":\\"
        if looks_like_path and not Path(announced).expanduser().is_dir():
            raise ValueError(
                f"this swarm serves the model in the folder {announced} on its own computer; copy that folder "
                "to this computer and choose it under Model, then join again"
            )
        return announced

    def swarm_peers(self) -> list[str]:
        """A joined swarm's peers: those of its invite (or typed by hand), then the members others can
        dial that this node learned from the swarm since (the swarm outlives whoever invited it)."""
        s = self.settings
        return list(dict.fromkeys([*s.custom_peers, *s.learned_peers]))

    def learn_members(self, stats: ServerStats) -> None:
        """Keep the directly reachable members the block server read from the swarm (newest first, bounded)
        as extra bootstrap peers and relays, and as members (privacy). Saved at once, with no restart: the
        server takes them at its next start (it restarts itself when its relays are gone)."""
        s = self.settings
        found = [a for a in stats.reachable_members if isinstance(a, str) and "/p2p/" in a]
        own = stats.peer_id
        new = [a for a in found if a not in s.custom_peers and a.rsplit("/p2p/", 1)[1] != own]
        if s.swarm != "custom" or not s.swarm_members or not new:
            return
        learned = list(dict.fromkeys([*new, *s.learned_peers]))[:MAX_LEARNED_PEERS]
        ids = [a.rsplit("/p2p/", 1)[1] for a in learned]
        members = list(dict.fromkeys([*s.swarm_members, *(i for i in ids if PEER_ID.match(i))]))[:1024]
        if learned == s.learned_peers and members == s.swarm_members:
            return
        logger.info("members others can dial, learned from the swarm: %s", " ".join(learned))
        self.settings = s.model_copy(update={"learned_peers": learned, "swarm_members": members})
        self._save_settings()

    def _swarm_port(self) -> int:
        """The kept swarm port (chosen on first use); a port another program took is replaced, and said."""
        s = self.settings
        loopback_only = s.swarm == "private" and not s.listen_on_lan
        running = self.supervisor.process is not None and self.supervisor.process.poll() is None
        running = running or self._restarting_server
        port = self.address.port_for(s.swarm_port, loopback_only, our_server_holds_it=running)
        if port != s.swarm_port:
            self.settings = s.model_copy(update={"swarm_port": port})
            self._save_settings()
        return port

    def server_args(self) -> list[str]:
        s = self.settings
        args = [self.model_path()]
        port = self._swarm_port()
        s = self.settings
        if s.swarm == "private":
            args.append("--new-swarm")
            if s.listen_on_lan:
                args += ["--host-maddrs", f"/ip4/0.0.0.0/tcp/{port}"]
            else:
                args += ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--no-relay", "--no-auto-nat"]
        else:
            args += ["--initial-peers", *(PUBLIC_INITIAL_PEERS if s.swarm == "public" else self.swarm_peers())]
            args += ["--host-maddrs", f"/ip4/0.0.0.0/tcp/{port}"]
        # The same peer id across pauses, restarts and reboots: invites already shared keep working.
        args += ["--identity-path", str(self.address.identity())]
        if s.nat_port_map and not (s.swarm == "private" and not s.listen_on_lan):
            args.append("--nat-port-map")
        if s.public_address and not (s.swarm == "private" and not s.listen_on_lan):
            # The port forwarded by hand: announced, with the LAN addresses (announcing replaces them).
            lan = [f"/ip4/{ip}/tcp/{port}" for ip in lan_addresses() if ip != s.public_address]
            args += ["--announce-maddrs", f"/ip4/{s.public_address}/tcp/{port}", *lan]
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
            args += ["--num-blocks", str(max(1, plan.recommended_blocks))]
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
        elif s.swarm != "public":  # friends see each other by name (the computer's); never on the public swarm
            args += ["--public-name", default_human_name()]
        if s.cpu_percent < 100:
            args += ["--num-threads", str(cpu_threads(s.cpu_percent))]
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
        else:  # deleted: no process the node starts from now on (servers, p2pd) inherits it
            os.environ.pop("HF_TOKEN", None)

    def set_hf_token(self, token: str | None) -> None:
        self.secrets.set("hf_token", token)
        self._server_env_token()

    def contribution(self, action: str) -> m.ActionResult:
        if action in ("start", "stop", "resume"):
            self.awaiting_consent = False  # the user has decided
        if action == "start":
            self.settings = self.settings.model_copy(update={"contribute": True})
            self._save_settings()
            self._server_env_token()
            try:
                args = self._server_args_preparing_the_model()
            except Exception as exc:  # the default model could not be converted (disk full, damaged file)
                logger.exception("the model could not be prepared: %s", exc)
                self.supervisor.state, self.supervisor.reason = "failed", f"the model could not be prepared: {exc}"
                return m.ActionResult(ok=False, message=self.supervisor.reason)
            self.supervisor.start(args)
            self._paused_by_policy = False
            return m.ActionResult(ok=True, message="Starting the block server.")
        if action == "stop":
            self.settings = self.settings.model_copy(update={"contribute": False})
            self._save_settings()
            self.supervisor.stop()
            return m.ActionResult(ok=True, message="Stopped: nothing is served until you start again.")
        if action == "pause":  # the blocks stay loaded: resuming takes about a second
            self.supervisor.pause("paused by the user; the model stays loaded", keep_model=True)
            return m.ActionResult(ok=True, message="Paused; the model stays loaded, so resuming is quick.")
        if action == "pause-free":
            self.supervisor.pause("paused by the user; the model's memory is freed")
            return m.ActionResult(ok=True, message="Paused and the model unloaded: its memory is free.")
        if self.supervisor.args is None:
            return self.contribution("start")
        self.supervisor.resume()
        return m.ActionResult(ok=True, message="Resuming.")

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
        if not allowed:
            self._pause_rule = pause_rule(self.settings, reason)
        elif allowed and self._paused_by_policy:
            self._paused_by_policy = False
            self.supervisor.resume()

    def _record_stats(self, stats: ServerStats | None) -> None:
        if stats is None or stats.state != "online":
            return  # the last counted stats stay: a run is told apart by its started_at
        last = self._last_stats
        if last is None or last.started_at != stats.started_at:
            # A server run seen for the first time: what it did before this tick counts too (its time
            # online included), so the all-time totals match the server's own counters.
            last = ServerStats(started_at=stats.started_at)
        tokens = max(stats.tokens_processed - last.tokens_processed, 0)
        sessions = max(stats.sessions_opened - last.sessions_opened, 0)
        steps = max(stats.inference_steps - last.inference_steps, 0)
        uptime = max(stats.uptime_s - last.uptime_s, 0)
        if any((tokens, sessions, steps, uptime)):
            self.db.add_contribution(int(time.time() // 3600), tokens, sessions, steps, uptime)
        self._last_stats = stats


def pause_rule(settings: Settings, reason: str) -> m.PauseRule:
    """Which of the user's rules paused contribution, and until when (as the window's banner says it)."""
    if "battery" in reason:
        return m.PauseRule(rule="battery", message=reason, until="until the computer is plugged in")
    if "window" in reason and settings.time_window:
        return m.PauseRule(rule="schedule", message=reason, until=f"until {settings.time_window.split('-')[0]}")
    return m.PauseRule(rule="idle", message=reason, until="until the computer is idle")
