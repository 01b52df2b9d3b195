"""The node's settings as the window reads them: the node's own `Settings` model, which also keeps the
fields of a newer node (sent back unchanged) and knows which fields an older node lacks (never shown as
switches, never sent to it: its API would refuse them)."""

from __future__ import annotations

from pydantic import ConfigDict

from corolla.node.settings import Settings


class NodeSettings(Settings):
    model_config = ConfigDict(extra="allow")

    def has(self, field: str) -> bool:
        """Whether the node sent this setting (an older node has no such setting)."""
        return field in self.model_fields_set

    def with_changes(self, **changes) -> dict:
        """The body of PUT /api/settings: the settings as the node sent them, with `changes`."""
        return {**self.model_dump(mode="json", include=self.model_fields_set), **changes}
