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
import threading
import time
from pathlib import Path

import psutil
from fastapi import HTTPException

from corolla import __version__
from corolla.node import api_models as m
from corolla.node.chats import ChatService, ClientTarget, NoSwarm, SwarmClientHost
from corolla.node.db import Database
from corolla.node.default_model import DefaultModel
from corolla.node.instance import AlreadyRunning, claim, new_token, read_address, release
from corolla.node.invites import make_invite
from corolla.node.lan_discovery import LanDiscovery, default_human_name, lan_maddrs
from corolla.node.paths import NodePaths
from corolla.node.secrets import SecretStore
from corolla.node.settings import PUBLIC_INITIAL_PEERS, Settings, contribution_allowed
from corolla.node.sharing import SwarmAddress, lan_addresses, sharing_status
from corolla.node.supervisor import ServerSupervisor

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


def cpu_threads(percent: int, cores: int | None = None) -> int:
    """The block server's compute threads for a share of the processor: 50 % of 8 cores -> 4."""
    cores = cores or os.cpu_count() or 1
    return max(1, round(cores * percent / 100))


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
        self.chats.clients.on_new_client = self._restore_flagged_servers
        self.chats.privacy_for = self.privacy_for
        self._last_stats: dict | None = None
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

    # --- the block server ---------------------------------------------------------------------------
    def _swarm_port(self) -> int:
        """The kept swarm port (chosen on first use); a port another program took is replaced, and said."""
        s = self.settings
        loopback_only = s.swarm == "private" and not s.listen_on_lan
        running = self.supervisor.process is not None and self.supervisor.process.poll() is None
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
            args += ["--initial-peers", *(PUBLIC_INITIAL_PEERS if s.swarm == "public" else s.custom_peers)]
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
                logger.error("the model could not be prepared: %s", exc)
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
        if action == "pause":
            self.supervisor.pause("paused by the user")
            return m.ActionResult(ok=True, message="Paused.")
        if self.supervisor.args is None:
            return self.contribution("start")
        self.supervisor.resume()
        return m.ActionResult(ok=True, message="Resuming.")

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

    # --- joining a private swarm --------------------------------------------------------------------
    def join_swarm(self, text: str) -> Settings:
        """Join the swarm an invite names: read it (bounded), try every address, then switch. Anything
        wrong is an HTTP error whose message says what to do; the settings are then left as they were."""
        from corolla.node.invites import InviteError, parse_invite
        from corolla.node.settings import PEER_ID
        from corolla.node.sharing import probe_addresses

        try:
            invite = parse_invite(text)
        except InviteError as exc:
            raise HTTPException(400, str(exc)) from exc
        own = (self.supervisor.poll().stats or {}).get("peer_id")
        if own and all(peer == own for peer in invite.peer_ids):
            raise HTTPException(
                400, "This is this computer's own invite: send it to your friends, who paste it on their computers."
            )
        changes: dict = {}
        if invite.model:
            try:  # the swarm's model too: blocks of another model under its prefix would only be turned away
                changes["model"] = self.model_setting_for(invite.model)
            except ValueError as exc:
                raise HTTPException(400, sentence_of(exc)) from exc
        answered, tried = probe_addresses(invite.peers)
        if not answered:
            raise HTTPException(
                503,
                f"None of the invite's {len(tried)} address(es) answered (tried {', '.join(tried)}). The computer "
                "that made it may be off or not contributing, or its router does not let others in: ask them to "
                "check that Corolla is contributing with Let others join, or ask another member for their invite.",
            )
        # Addresses that answered first; loopback ones only from this very computer's invite (tests).
        usable = [p for p in invite.peers if not p.startswith(("/ip4/127.", "/ip6/::1/"))] or invite.peers
        peers = sorted(usable, key=lambda p: p not in answered)
        members = [p for p in invite.peer_ids if PEER_ID.match(p)]
        known = [p for p in self.settings.swarm_members if p not in members]
        changes.update(swarm="custom", custom_peers=peers, swarm_members=(members + known)[:1024])
        if invite.dht_prefix:
            changes["dht_prefix"] = invite.dht_prefix
        self.apply_settings(self.settings.model_copy(update=changes))
        return self.settings

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
        from corolla.swarm.client.privacy import PrivacyError
        from corolla.swarm.client.routing import MissingBlocksError
        from corolla.swarm.client.session import ServerFailure
        from corolla.swarm.models.errors import EngineError
        from corolla.swarm.peers import PeerStartError

        try:
            return fn(*args)
        except NoSwarm as exc:  # the node's own state: contribution is off in a private swarm
            raise HTTPException(409, str(exc)) from exc
        except PrivacyError as exc:  # e.g. "only these peers" with an empty list of trusted peers
            raise HTTPException(400, str(exc)) from exc
        except EngineError as exc:  # a model that cannot be opened or is not supported
            raise HTTPException(400, str(exc)) from exc
        except (MissingBlocksError, ServerFailure) as exc:  # the swarm, not this request, is at fault
            raise HTTPException(503, str(exc)) from exc
        except PeerStartError as exc:  # no initial peer answered (a member restarted elsewhere, all are off)
            raise HTTPException(
                503,
                f"This computer cannot reach the swarm: {sentence_of(exc)} Check that at least one member's "
                "Corolla is contributing, or paste a fresh invite from a member under Settings, Swarm.",
            ) from exc

    def swarm_health(self) -> list[dict]:
        from corolla.swarm.client.health import read_swarm_health

        model = self.call_swarm(self.chats.clients.get)
        extra = {model.dht_prefix: model.view.num_blocks}
        models = model._loop.run(read_swarm_health(model.dht, model.view.p2p, extra), timeout=60)
        own = (self.supervisor.poll().stats or {}).get("peer_id")
        route = self._current_route(model)
        flagged = self.db.flagged_servers()
        slow = self.db.slow_servers()
        result = []
        for health in models:
            data = health.to_dict()
            data["route"] = route if health.dht_prefix == model.dht_prefix else []
            for server in data["servers"]:
                server["this_computer"] = server["peer_id"] == own
                server["verification"] = self._verification(model, server, data["servers"], flagged)
                server["speed"] = self._speed(model, server, slow)
            result.append(data)
        return result

    # --- spot checks (swarm/client/verification.py) --------------------------------------------------
    def _restore_flagged_servers(self, model) -> None:
        """A new swarm client starts with the node's flagged servers blocked, and records new flags here."""
        from corolla.swarm.client.speed import speed_of
        from corolla.swarm.client.verification import block, ledger_of

        ledger = ledger_of(model.view)
        for peer, evidence in self.db.flagged_servers().items():
            ledger.flagged[peer] = evidence
            block(model.view, peer)
        ledger.on_flag.append(self.db.flag_server)
        speed = speed_of(model.view)  # servers found slow lately keep their discount in routing
        for evidence in self.db.slow_servers().values():
            speed.mark_slow(evidence)
        speed.on_slow.append(self.db.note_slow_server)

    def _verification(self, model, server: dict, servers: list[dict], flagged: dict[str, dict]) -> dict:
        """verified | unverified | flagged, with the number of checks passed and the evidence of a flag."""
        from corolla.swarm.client.verification import ledger_of

        ledger = ledger_of(model.view)
        peer = server["peer_id"]
        evidence = ledger.flagged.get(peer) or flagged.get(peer)
        start, end = server["start_block"], server["end_block"]
        second = any(
            other["peer_id"] != peer and other["start_block"] <= start and other["end_block"] >= end
            for other in servers
        )
        if evidence is not None:
            state = "flagged"
        elif second and ledger.checks[peer]:
            state = "verified"
        else:
            state = "unverified"
        return {"state": state, "checks": int(ledger.checks[peer]), "evidence": evidence}

    @staticmethod
    def _speed(model, server: dict, slow: dict[str, dict]) -> dict:
        """slow | measured | unmeasured: this client's step times of the server against its announcement,
        with the evidence of a slow verdict (this session's, else the node's record)."""
        from corolla.swarm.client.speed import speed_of

        summary = speed_of(model.view).summary(server["peer_id"])
        if summary["evidence"] is None and server["peer_id"] in slow:
            summary.update(state="slow", evidence=slow[server["peer_id"]])
        return summary

    def check_server(self, peer_id: str) -> dict | None:
        """Check one server on purpose (the API's POST /api/swarm/check); None if it serves nothing."""
        from corolla.swarm.client.verification import check_server

        model = self.call_swarm(self.chats.clients.get)
        verdict = self.call_swarm(lambda: model._loop.run(check_server(model, peer_id), timeout=180))
        if verdict is None:
            return None
        return {
            "peer_id": peer_id,
            "state": verdict.state if verdict.state in ("verified", "flagged") else "unverified",
            "detail": verdict.detail,
            "max_error": verdict.max_error,
            "compared_with": verdict.compared_with,
        }

    # --- privacy: who may receive a chat's hidden states ----------------------------------------------
    def check_privacy_choice(self, choice: m.PrivacyChoice) -> dict:
        """A chat's choice as stored; HTTP 400 for a malformed or empty peer list."""
        from corolla.swarm.client.privacy import PrivacyError, check_peer_ids

        if choice.level == "peers":
            try:
                peers = sorted(check_peer_ids(choice.peers or self.settings.trusted_peers, "list of trusted peers"))
            except PrivacyError as exc:
                raise HTTPException(400, str(exc)) from exc
            return {"level": "peers", "peers": peers}
        if choice.peers:
            raise HTTPException(400, f'privacy level "{choice.level}" takes no peer list (only "peers" does)')
        return {"level": choice.level, "peers": None}

    def own_peer_ids(self) -> set[str]:
        """This computer's block server, while it serves."""
        stats = self.supervisor.poll().stats or {}
        peer = stats.get("peer_id") if stats.get("state") == "online" else None
        return {peer} if peer else set()

    def privacy_for(self, stored: dict | None):
        """The swarm client's Privacy for a chat's stored choice (None: the default_privacy setting).
        "local" is this computer's server; "members" adds the servers of the swarms this node joined by
        invite and, in its own private swarm (reached only through its invite or the LAN), every server
        in it. Raises NoSwarm (HTTP 409) when the choice names nobody now."""
        from corolla.swarm.client.privacy import Privacy

        level = (stored or {}).get("level") or self.settings.default_privacy
        if level == "any":
            return Privacy()
        if level == "peers":
            return Privacy.only((stored or {}).get("peers") or self.settings.trusted_peers)
        own = self.own_peer_ids()
        if level == "local":
            if not own:
                raise NoSwarm(
                    "privacy is 'this computer only', but this computer serves no blocks now: start contributing "
                    "(it must serve the whole model), or choose another privacy level for this chat"
                )
            return Privacy.local(own)
        members = own | set(self.settings.swarm_members)
        if self.settings.swarm == "private":
            model = self.chats.clients.get()
            model._loop.run(model.view.refresh_if_stale(), timeout=30)
            members |= set(model.view.spans)
        if not members:
            raise NoSwarm(
                "privacy is 'members of my swarms', but this node is in no private swarm: create one (contribute "
                "in the private swarm) or join one with an invite, or choose another privacy level for this chat"
            )
        return Privacy.members(members)

    @staticmethod
    def _current_route(model) -> list[dict]:
        """The chain of servers a new chat session would take now (the map draws it); [] if none."""
        try:
            model._loop.run(model.view.refresh_if_stale(), timeout=30)
            segments = model.view.route(0, model.view.num_blocks)
        except Exception:  # no complete route: the map shows the gap instead
            return []
        return [{"peer_id": s.peer_id, "start": s.start, "end": s.end} for s in segments]

    # --- status, hardware --------------------------------------------------------------------------
    def status(self) -> m.NodeStatus:
        sup = self.supervisor.poll()
        stats = sup.stats or {}
        reason = sup.reason
        if self.default_model.preparing and self.default_model.stage:  # the first start's conversion, step by step
            reason = f"{reason}: {self.default_model.stage}"
        contribution = m.ContributionStatus(
            state=sup.state,
            reason=reason,
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
            sessions_peak=stats.get("sessions_peak", 0),
            token_steps=stats.get("token_steps", 0),
            step_forwards=stats.get("step_forwards", 0),
            batch_sizes=stats.get("batch_sizes") or {},
            cache_bytes_total=stats.get("cache_bytes_total", 0),
            cache_bytes_left=stats.get("cache_bytes_left", 0),
            uptime_s=stats.get("uptime_s", 0.0),
            peer_id=stats.get("peer_id"),
        )
        invite = self.invite(stats) if sup.state == "online" else None
        sharing = None
        if self.settings.swarm != "public":
            others = self.settings.swarm == "custom" or self.settings.listen_on_lan
            state = (stats.get("reachability") or {}).get("state", "checking") if sup.pid is not None else "checking"
            sharing = sharing_status(
                others,
                self.settings.swarm_port,
                lan_addresses(),
                state,
                self.settings.nat_port_map,
                self.address.port_notice,
            )
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
            awaiting_consent=self.awaiting_consent,
            pause_rule=self._pause_rule if sup.state == "paused" and self._paused_by_policy else None,
            lifetime=m.Lifetime(**self.db.contribution_totals()),
            reachability=_reachability(stats) if sup.pid is not None else m.NOT_CHECKED,
            sharing=sharing,
        )

    def invite(self, stats: dict) -> str | None:
        """The invite to this swarm, only where others may join: every address a friend might dial (this
        server's public, relay and LAN ones; for a member that joined, the members it joined through)."""
        s = self.settings
        if s.swarm == "public" or (s.swarm == "private" and not s.listen_on_lan):
            return None
        if s.swarm == "custom" and not s.swarm_members:
            return None  # custom peers typed by hand: not a private swarm this node was invited to
        own = [a for a in stats.get("visible_maddrs") or () if not a.startswith(("/ip4/127.", "/ip6/::1/"))]
        relayed = (stats.get("reachability") or {}).get("relay_addrs") or []
        members = list(s.custom_peers) if s.swarm == "custom" else []
        if not own and not relayed:
            return None
        return make_invite([*own, *relayed, *members], self.dht_prefix() or "", self.model_id(), s.public_name)

    def server_log(self, lines: int) -> str:
        """The block server's last log lines (the window shows them next to the last failure)."""
        try:
            with open(self.supervisor.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(log.tell() - 256 * 1024, 0))  # bounded: the log may be large
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

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
        self.sync_lan(status.state, status.stats or {})

    # --- swarms on this network --------------------------------------------------------------------
    def lan_announcement_blocker(self, state: str, stats: dict) -> str | None:
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
        if state != "online" or not lan_maddrs(stats.get("visible_maddrs") or []):
            return "the private swarm is not online yet"
        return None

    def sync_lan(self, state: str, stats: dict) -> None:
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
                self.lan.announce(name, self.model_display_name(), self.dht_prefix() or "", stats["visible_maddrs"])
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
            "not_announced_because": self.lan_announcement_blocker(sup.state, sup.stats or {}),
            "swarms": [swarm.to_dict() for swarm in lan.swarms()] if lan else [],
        }

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

    def _record_stats(self, stats: dict | None) -> None:
        if not stats or stats.get("state") != "online":
            return  # the last counted stats stay: a run is told apart by its started_at
        last = self._last_stats
        if last is None or last.get("started_at") != stats.get("started_at"):
            # A server run seen for the first time: what it did before this tick counts too (its time
            # online included), so the all-time totals match the server's own counters.
            last = {}

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


def sentence_of(exc: Exception) -> str:
    text = str(exc).strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def pause_rule(settings: Settings, reason: str) -> m.PauseRule:
    """Which of the user's rules paused contribution, and until when (as the window's banner says it)."""
    if "battery" in reason:
        return m.PauseRule(rule="battery", message=reason, until="until the computer is plugged in")
    if "window" in reason and settings.time_window:
        return m.PauseRule(rule="schedule", message=reason, until=f"until {settings.time_window.split('-')[0]}")
    return m.PauseRule(rule="idle", message=reason, until="until the computer is idle")


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


def _reachability(stats: dict) -> m.Reachability:
    """The block server's own finding (see corolla.swarm.reachability), as the API shows it."""
    found = stats.get("reachability") or {}
    if found.get("state") not in {"checking", "direct", "relay", "unreachable", "unknown", "local"}:
        return m.NOT_CHECKED
    return m.Reachability(
        state=found["state"],
        summary=str(found.get("summary", "")),
        advice=str(found.get("advice", "")),
        using_relay=bool(stats.get("using_relay")),
        relay_addrs=[str(a) for a in found.get("relay_addrs", [])],
        checked_at=found.get("checked_at"),
        relay_proven_at=found.get("relay_proven_at"),
    )
