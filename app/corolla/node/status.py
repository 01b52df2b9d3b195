"""What the node reports about itself: its status (contribution, reachability, who can join), the
block server's log, and what this computer's hardware can serve."""

from __future__ import annotations

import logging
import os

from corolla import __version__
from corolla.api import models as m
from corolla.node.invites import make_invite
from corolla.node.sharing import lan_addresses, sharing_status
from corolla.swarm.server.stats import ServerStats

logger = logging.getLogger(__name__)


class StatusMixin:
    """NodeService's status and hardware reports (service.py)."""

    def status(self) -> m.NodeStatus:
        sup = self.supervisor.poll()
        stats = sup.stats or ServerStats(started_at=0.0)
        reason = sup.reason
        if self.default_model.preparing and self.default_model.stage:  # the first start's conversion, step by step
            reason = f"{reason}: {self.default_model.stage}"
        contribution = m.ContributionStatus(
            state=sup.state,
            reason=reason,
            restarts=sup.restarts,
            last_failure=sup.last_failure,
            pid=sup.pid,
            start_block=stats.start_block,
            end_block=stats.end_block,
            throughput=stats.throughput if sup.stats is not None else None,
            tokens_served=stats.tokens_processed,
            inference_steps=stats.inference_steps,
            sessions_active=stats.sessions_active,
            sessions_opened=stats.sessions_opened,
            sessions_peak=stats.sessions_peak,
            token_steps=stats.token_steps,
            step_forwards=stats.step_forwards,
            batch_sizes=stats.batch_sizes,
            cache_bytes_total=stats.cache_bytes_total,
            cache_bytes_left=stats.cache_bytes_left,
            uptime_s=stats.uptime_s,
            peer_id=stats.peer_id if sup.stats is not None else None,
            model_kept=sup.state == "paused" and self.supervisor.keeping_model,
        )
        invite = self.invite(stats) if sup.state == "online" else None
        sharing = None
        if self.settings.swarm != "public":
            others = self.settings.swarm == "custom" or self.settings.listen_on_lan
            found = stats.reachability if sup.pid is not None else None
            state = found.state if found is not None else "checking"
            names = stats.member_names if sup.pid is not None else {}
            relays = found.relay_addrs if sup.pid is not None and found is not None else []
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

    def invite(self, stats: ServerStats) -> str | None:
        """The invite to this swarm, only where others may join: every address a friend might dial (this
        server's public, relay and LAN ones; for a member that joined, the members it joined through)."""
        s = self.settings
        if s.swarm == "public" or (s.swarm == "private" and not s.listen_on_lan):
            return None
        if s.swarm == "custom" and not s.swarm_members:
            return None  # custom peers typed by hand: not a private swarm this node was invited to
        own = [a for a in stats.visible_maddrs if not a.startswith(("/ip4/127.", "/ip6/::1/"))]
        relayed = stats.reachability.relay_addrs if stats.reachability is not None else []
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

    def plan(self, model: str | None, torch_dtype: str, quant_type: str) -> m.BlockPlan:
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
        )

    def hardware(self, model: str | None, torch_dtype: str, quant_type: str) -> m.HardwareReport:
        from corolla.node.hardware import detect

        report = detect()
        report.plan = self.call_swarm(self.plan, model, torch_dtype, quant_type)
        return report


def _reachability(stats: ServerStats) -> m.Reachability:
    """The block server's own finding (see corolla.swarm.reachability), as the API shows it."""
    found = stats.reachability
    if found is None or found.state not in {"checking", "direct", "relay", "unreachable", "unknown", "local"}:
        return m.NOT_CHECKED
    return m.Reachability(
        state=found.state,
        summary=found.summary,
        advice=found.advice,
        using_relay=stats.using_relay,
        relay_addrs=found.relay_addrs,
        checked_at=found.checked_at,
        relay_proven_at=found.relay_proven_at,
    )
