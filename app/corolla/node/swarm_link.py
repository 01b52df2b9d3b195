"""The node's link to the swarm as a client: joining a private swarm by invite, the swarm client it
chats through, the swarm's health with what this client knows of each server (spot checks, speed), and
who may receive a chat's hidden states (privacy)."""

from __future__ import annotations

import logging

from corolla.api import models as m
from corolla.chat_engine.channel import ChannelError
from corolla.node.chats import ClientTarget, NoSwarm
from corolla.node.engine_link import ask_engine
from corolla.node.errors import NodeError, sentence_of
from corolla.node.hardware import PlanError
from corolla.node.lazy_imports import engine_imports
from corolla.node.settings import PUBLIC_INITIAL_PEERS, Settings
from corolla.swarm.peer_ids import PeerListError, check_peer_ids
from corolla.swarm.server.stats import ServerStats

logger = logging.getLogger(__name__)
SWARM_READ_TIMEOUT_S = 90.0  # the window waits as long for its swarm request
CHECK_TIMEOUT_S = 200.0  # a deliberate check runs up to 180 s in the engine
NO_MEMBERS = (
    "privacy is 'members of my swarms', but this node is in no private swarm: create one (contribute "
    "in the private swarm) or join one with an invite, or choose another privacy level for this chat"
)


class SwarmLinkMixin:
    """The swarm client side of NodeService (service.py): uses its `settings`, `supervisor`, `chats`,
    `db`, `apply_settings` and the model methods of ContributionMixin."""

    def join_swarm(self, text: str) -> Settings:
        """Join the swarm an invite names: read it (bounded), try every address, then switch. Anything
        wrong is an HTTP error whose message says what to do; the settings are then left as they were."""
        from corolla.node.invites import InviteError, parse_invite
        from corolla.node.settings import PEER_ID
        from corolla.node.sharing import probe_addresses

        try:
            invite = parse_invite(text)
        except InviteError as exc:
            raise NodeError(400, str(exc)) from exc
        own = _own_peer_id(self.supervisor.poll().stats)
        if own and all(peer == own for peer in invite.peer_ids):
            raise NodeError(
                400, "This is this computer's own invite: send it to your friends, who paste it on their computers."
            )
        changes: dict = {}
        if invite.model:
            try:  # the swarm's model too: blocks of another model under its prefix would only be turned away
                changes["model"] = self.model_setting_for(invite.model)
            except ValueError as exc:
                raise NodeError(400, sentence_of(exc)) from exc
        answered, tried = probe_addresses(invite.peers)
        if not answered:
            raise NodeError(
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
        # Members learned in an earlier swarm are not this one's: they are learned again from this swarm.
        changes.update(swarm="custom", custom_peers=peers, swarm_members=(members + known)[:1024], learned_peers=[])
        if invite.dht_prefix:
            changes["dht_prefix"] = invite.dht_prefix
        self.apply_settings(self.settings.model_copy(update=changes))
        return self.settings

    def _client_target(self) -> ClientTarget:
        s = self.settings
        if s.swarm == "private":
            stats = self.supervisor.poll().stats
            peers = tuple(stats.visible_maddrs) if stats is not None and stats.state == "online" else ()
            return ClientTarget(self.model_path(), self.dht_prefix(), peers, not s.listen_on_lan, s.chat_local_blocks)
        peers = tuple(PUBLIC_INITIAL_PEERS if s.swarm == "public" else self.swarm_peers())
        return ClientTarget(self.model_path(), self.dht_prefix(), peers, False, s.chat_local_blocks)

    def call_swarm(self, fn, *args):
        """Run a swarm call; swarm-side failures become 503 errors that say what to do."""
        try:
            return fn(*args)
        except Exception as exc:
            error = _as_node_error(exc)
            if error is None:
                raise
            raise error from exc

    def swarm_health(self) -> list[dict]:
        """The Swarm pane's report (chat_engine/swarm_report.py): read by the block server's engine while the
        node contributes (the window asks every few seconds: the node's own client would bring torch and
        the model's embeddings into the node), else by the node's own client."""
        own = _own_peer_id(self.supervisor.poll().stats)
        answer = self._ask_engine({"type": "swarm", "own": own}, SWARM_READ_TIMEOUT_S, "read the swarm")
        if answer is not None:
            return answer["models"]
        model = self.call_swarm(self.chats.clients.get)
        with engine_imports():
            from corolla.chat_engine.swarm_report import swarm_report  # after: no swarm, no torch (Footprint)

        return swarm_report(model, own, self.db.flagged_servers(), self.db.slow_servers())

    def _ask_engine(self, request: dict, timeout: float, doing: str) -> dict | None:
        """The block server's engine's answer to `request`, sent with the node's chat target and the servers
        it flagged or found slow; None where there is no engine or it cannot be reached (the node then does
        it itself). An error the engine answers is raised as the NodeError the node's own try would give."""
        address = self.supervisor.chat_engine()
        if address is None:
            return None
        request = {**request, "target": self._client_target().to_dict(), "flagged": self.db.flagged_servers()}
        request["slow"] = list(self.db.slow_servers().values())
        try:
            answer = ask_engine(address, request, timeout=timeout)
        except (OSError, ChannelError, TimeoutError) as exc:
            logger.warning("the block server's engine cannot %s (%s): this node does it itself", doing, exc)
            return None
        if answer["type"] == "error":
            raise engine_error(answer)
        return answer

    def _restore_flagged_servers(self, model) -> None:
        """A new swarm client starts with the node's flagged servers blocked, and records new flags here."""
        with engine_imports():
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

    def check_server(self, peer_id: str) -> dict | None:
        """Check one server on purpose (the API's POST /api/swarm/check); None if it serves nothing. While
        the node contributes, the block server's engine checks (its client is there: no torch here)."""
        answer = self._ask_engine({"type": "check", "peer_id": peer_id}, CHECK_TIMEOUT_S, "check the server")
        if answer is not None:
            for note in answer.get("notes") or []:
                self.record_engine_note(note)
            return answer["verdict"]
        with engine_imports():
            from corolla.chat_engine.swarm_report import check_answer
            from corolla.swarm.client.server_check import check_server

        model = self.call_swarm(self.chats.clients.get)
        verdict = self.call_swarm(lambda: model.run_async(check_server(model, peer_id), timeout=180))
        return check_answer(peer_id, verdict)

    def check_privacy_choice(self, choice: m.PrivacyChoice) -> dict:
        """A chat's choice as stored; HTTP 400 for a malformed or empty peer list."""
        if choice.level == "peers":
            try:
                peers = sorted(check_peer_ids(choice.peers or self.settings.trusted_peers, "list of trusted peers"))
            except PeerListError as exc:
                raise NodeError(400, str(exc)) from exc
            return {"level": "peers", "peers": peers}
        if choice.peers:
            raise NodeError(400, f'privacy level "{choice.level}" takes no peer list (only "peers" does)')
        return {"level": choice.level, "peers": None}

    def own_peer_ids(self) -> set[str]:
        """This computer's block server, while it serves."""
        stats = self.supervisor.poll().stats
        peer = stats.peer_id if stats is not None and stats.state == "online" else None
        return {peer} if peer else set()

    def privacy_spec(self, stored: dict | None) -> dict:
        """A chat's stored choice (None: the default_privacy setting) resolved to peer ids, without the
        swarm client: {"level", "peers", "with_swarm_servers"}. "local" is this computer's server;
        "members" adds the servers of the swarms this node joined by invite and, in its own private swarm
        (reached only through its invite or the LAN), every server in it (`with_swarm_servers`: the client
        adds those it sees). Raises NoSwarm (HTTP 409) when the choice names nobody now."""
        level = (stored or {}).get("level") or self.settings.default_privacy
        if level == "any":
            return {"level": "any", "peers": None}
        if level == "peers":
            return {"level": "peers", "peers": list((stored or {}).get("peers") or self.settings.trusted_peers)}
        own = self.own_peer_ids()
        if level == "local":
            if not own:
                raise NoSwarm(
                    "privacy is 'this computer only', but this computer serves no blocks now: start contributing "
                    "(it must serve the whole model), or choose another privacy level for this chat"
                )
            return {"level": "local", "peers": sorted(own)}
        members = own | set(self.settings.swarm_members)
        in_own_swarm = self.settings.swarm == "private"
        if not members and not in_own_swarm:
            raise NoSwarm(NO_MEMBERS)
        return {"level": "members", "peers": sorted(members), "with_swarm_servers": in_own_swarm}

    def privacy_for(self, stored: dict | None):
        """The swarm client's Privacy for a chat's stored choice (privacy_spec), for this node's own client."""
        with engine_imports():
            from corolla.swarm.client.privacy import Privacy, as_privacy

        spec = self.privacy_spec(stored)
        if spec.pop("with_swarm_servers", False):
            model = self.chats.clients.get()
            model.run_async(model.view.refresh_if_stale(), timeout=30)
            spec["peers"] = sorted({*spec["peers"], *model.view.spans})
            if not spec["peers"]:
                raise NoSwarm(NO_MEMBERS)
        return Privacy() if spec["level"] == "any" else as_privacy(spec)

    def engine_context(self, chat: dict) -> dict:
        """What the block server's chat engine needs besides the chat: the client's target, the chat's
        privacy resolved, and the servers this node has flagged or found slow (engine_replies.py)."""
        return {
            "target": self._client_target().to_dict(),
            "privacy": self.privacy_spec(chat.get("privacy")),
            "flagged": self.db.flagged_servers(),
            "slow": list(self.db.slow_servers().values()),
        }

    def record_engine_note(self, note: dict) -> None:
        """A server the engine's client flagged or found slow: kept, as this node's own client does."""
        if note["type"] == "flag" and isinstance(note["evidence"].get("peer_id"), str):
            self.db.flag_server(note["evidence"])
        elif note["type"] == "slow" and isinstance(note["evidence"].get("peer_id"), str):
            self.db.note_slow_server(note["evidence"])


def _as_node_error(exc: Exception) -> NodeError | None:
    """The NodeError a swarm-side failure becomes (None: not one of those). The error classes are imported
    only here, when there is an error to sort: they import torch and the client, which an idle node
    answering the window's hardware request would otherwise hold (README, Footprint)."""
    if isinstance(exc, NoSwarm):  # the node's own state: contribution is off in a private swarm
        return NodeError(409, str(exc))
    if isinstance(exc, PlanError):  # the block plan's model cannot be opened or is not supported
        return NodeError(400, str(exc))
    with engine_imports():
        from corolla.swarm.client.local_edges import LocalEdgesError
        from corolla.swarm.client.privacy import PrivacyError
        from corolla.swarm.client.routing import MissingBlocksError
        from corolla.swarm.client.session import ServerFailure
        from corolla.swarm.models.errors import EngineError
        from corolla.swarm.peers import PeerStartError

    if isinstance(exc, PrivacyError):  # e.g. "only these peers" with an empty list of trusted peers
        return NodeError(400, str(exc))
    if isinstance(exc, LocalEdgesError):  # more local blocks than the model can spare: the setting says what
        return NodeError(400, f"{exc} (lower 'Blocks run on this computer' in the settings)")
    if isinstance(exc, EngineError):  # a model that cannot be opened or is not supported
        return NodeError(400, str(exc))
    if isinstance(exc, (MissingBlocksError, ServerFailure)):  # the swarm, not this request, is at fault
        return NodeError(503, str(exc))
    if isinstance(exc, PeerStartError):  # no initial peer answered (a member restarted elsewhere, all are off)
        return NodeError(
            503,
            f"This computer cannot reach the swarm: {sentence_of(exc)} Check that at least one member's "
            "Corolla is contributing, or paste a fresh invite from a member under Settings, Swarm.",
        )
    return None


def engine_error(answer: dict) -> NodeError:
    """The NodeError for the engine's failed swarm read, as _as_node_error sorts the node's own failures."""
    kind, message = str(answer.get("kind")), str(answer.get("message"))
    if kind == "no_swarm":
        return NodeError(409, message)
    if kind in ("PrivacyError", "LocalEdgesError", "EngineError", "PlanError", "RequestError"):
        return NodeError(400, message)
    if kind == "PeerStartError":
        return NodeError(503, f"This computer cannot reach the swarm: {message}")
    return NodeError(503, message)


def _own_peer_id(stats: ServerStats | None) -> str | None:
    """This node's block server's peer id, if it has one (a chat never checks its own server)."""
    return stats.peer_id or None if stats is not None else None
