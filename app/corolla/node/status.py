"""What the node reports about itself: its status (contribution, reachability, who can join), the
block server's log, and what this computer's hardware can serve."""

from __future__ import annotations

import logging
import os

from corolla import __version__
from corolla.api import models as m
from corolla.node.invites import make_invite
from corolla.node.sharing import lan_addresses, sharing_status

logger = logging.getLogger(__name__)


class StatusMixin:
    """NodeService's status and hardware reports (service.py)."""

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
            model_kept=sup.state == "paused" and self.supervisor.keeping_model,
        )
        invite = self.invite(stats) if sup.state == "online" else None
        sharing = None
        if self.settings.swarm != "public":
            others = self.settings.swarm == "custom" or self.settings.listen_on_lan
            state = (stats.get("reachability") or {}).get("state", "checking") if sup.pid is not None else "checking"
            names = stats.get("member_names") or {} if sup.pid is not None else {}
            relays = (stats.get("reachability") or {}).get("relay_addrs") or [] if sup.pid is not None else []
            relay_ids = [a.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[-1] for a in relays]
            sharing = sharing_status(
                others,
                self.settings.swarm_port,
                lan_addresses(),
                state,
                self.settings.nat_port_map,
                self.address.port_notice,
                relay_names=list(dict.fromkeys(names.get(p, p[-6:]) for p in relay_ids)),
                reachable_names=list(names.values()),
            )
        return m.NodeStatus(
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            model=self.model_display_name(),
            model_is_demo=self.is_demo,
            dht_prefix=self.dht_prefix() or self.chats.clients.dht_prefix(),
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
        members = self.swarm_peers() if s.swarm == "custom" else []
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
