"""A multi-step inference session as the Python API shows it: synchronous, over the client's loop, with
the blocks this client runs itself (local_edges.py) kept in step with the swarm's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from corolla.swarm.client import speculative
from corolla.swarm.client.privacy import Privacy
from corolla.swarm.client.session import InferenceSession

if TYPE_CHECKING:
    from corolla.swarm.client.remote_model import DistributedModelForCausalLM


class RemoteSession:
    """A multi-step inference session (synchronous wrapper); use as a context manager."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        max_length: int,
        prompts: torch.Tensor | None = None,
        privacy: Privacy | None = None,
    ):
        self.model = model
        self.max_length = max_length
        view = model.view.under(privacy)
        edges = model.local_edges
        self._session = InferenceSession(
            view,
            max_length,
            adapter=model.active_adapter,
            prompts=prompts,
            blocks=edges.remote_range if edges is not None else None,
        )
        self._prompts = prompts
        self._edges = edges.session() if edges is not None else None  # caches of the blocks run here
        self.pending: torch.Tensor | None = None  # tokens generated but not yet sent to the servers
        self.speculated = speculative.SpeculationStats()  # drafts of this session's generations so far

    @property
    def position(self) -> int:
        return self._session.position

    @property
    def route(self) -> str:
        return self._session.describe()

    @property
    def supports_rollback(self) -> bool:
        """True if every server on the route honours `start_from_position` (Petals 2.2 servers ignore it,
        and their version string cannot tell; Corolla servers announce `corolla_version`)."""
        spans = self.model.view.spans
        route = self._session.route
        return bool(route) and all(
            seg.peer_id in spans and spans[seg.peer_id].server_info.extra.get("corolla_version") for seg in route
        )

    @property
    def replacements(self) -> int:
        return self._session.replacements

    @property
    def privacy(self) -> Privacy:
        return self._session.view.privacy

    @property
    def recipients(self) -> dict[str, set[tuple[int, int]]]:
        """Every server that received this session's hidden states: peer id -> block ranges."""
        return self._session.recipients

    def server_names(self) -> dict[str, str]:
        """The public names the servers this session used announce (peer id -> name)."""
        spans = {**self.model.view.spans, **self._session.view.spans}
        return {
            peer: str(span.server_info.public_name or "")
            for peer, span in spans.items()
            if peer in self._session.recipients
        }

    @property
    def padded(self) -> bool:
        """The batch has padding: every step carries the attention mask."""
        return self._session.padded

    def step(
        self,
        hidden: torch.Tensor,
        *,
        hypo_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._edges is None:
            return self.model._loop.run(self._session.step(hidden, hypo_ids=hypo_ids, attention_mask=attention_mask))
        position = self._session.position
        if self._edges.position != position:  # a failed step or a restart left them apart
            self._edges.rollback(position)
        try:
            hidden = self._edges.before(hidden, hypo_ids=hypo_ids, mask=attention_mask, prompts=self._prompts)
            out = self.model._loop.run(self._session.step(hidden, hypo_ids=hypo_ids, attention_mask=attention_mask))
            return self._edges.after(out, mask=attention_mask, prompts=self._prompts)
        except BaseException:
            self._edges.rollback(position)  # the swarm did not take this step: neither do the edges
            raise

    @property
    def local_blocks(self) -> str | None:
        """Which blocks ran on this computer (None: all went to the swarm)."""
        return self.model.local_edges.describe() if self._edges is not None else None

    def rollback(self, position: int) -> None:
        self.model._loop.run(self._session.rollback(position))
        if self._edges is not None:
            self._edges.rollback(position)
        self.pending = None

    def close(self, timeout: float | None = None) -> None:
        if self.model._loop.closed:
            return  # the client closed first: its streams ended with its connections (e.g. settings changed)
        self.model._loop.run(self._session.close(), timeout)

    def close_in_background(self) -> None:
        """Close without waiting for the servers' end of the streams (a round trip): generate() returns
        its tokens at once. Later steps on this session fail as on a closed session."""
        # The close cancels the session's spot checks first thing, on the loop (tasks are not thread-safe).
        if not self.model._loop.close_later(self._session.close()):
            self.close()

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
