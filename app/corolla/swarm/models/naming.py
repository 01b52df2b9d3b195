"""The DHT prefix a model is announced under: the part of every module uid before the dot."""

from __future__ import annotations

from corolla.swarm.models.checkpoint import Checkpoint
from corolla.swarm.models.errors import EngineError
from corolla.swarm.models.family import validate_dht_prefix


def resolve_dht_prefix(checkpoint: Checkpoint, explicit: str | None = None) -> str:
    """An explicit prefix wins; then a `dht_prefix` in config.json (what stock Petals reads for local
    folders); then the family's rule applied to the hub repo id. A local folder with neither fails."""
    if explicit:
        return validate_dht_prefix(explicit)
    from_config = checkpoint.raw_config.get("dht_prefix")
    if isinstance(from_config, str) and from_config:
        return validate_dht_prefix(from_config)
    if checkpoint.is_local:
        raise EngineError(
            f"{checkpoint.source_name} is a local folder: give a DHT prefix (--dht-prefix), "
            'or add "dht_prefix" to its config.json'
        )
    return validate_dht_prefix(checkpoint.family.dht_prefix_from_repo(checkpoint.source_name))
