"""The model engine: run any span of a transformers decoder, loading only its weights.

Which file plays which role:
- family.py: the per-architecture adapter interface, the registry, block-tensor naming;
  families/: one adapter per family (dht_prefix rule, masks, rotary or alibi inputs, client stages).
- checkpoint.py: a local folder or hub repo, its config and weight index; reads only the shards asked for.
- loading.py: builds the meta skeleton and loads blocks [a, b) or the client parts into it.
- span.py / cache.py: a loaded span and its per-session KV cache; client_parts.py: embeddings and head.
- static_cache.py: the KV cache preallocated to a session's max_length (exactly the dynamic path's
  results, rollback at any depth); decode_graph.py: its decode steps as CUDA graphs on a GPU.
- devices.py: device and dtype choice and checks; quantization.py: int8 / nf4 via bitsandbytes.
- batched_step.py: one forward for the token steps of several sessions on the same span.
- naming.py: the DHT prefix a model is announced under; errors.py: errors with a message a person can act on.
- gguf_import.py: a GGUF file turned into an ordinary checkpoint folder (`corolla model import`).
- memory.py: bytes held by a loaded part; tiny.py: tiny random models for tests and the offline demo.
"""

from corolla.swarm.models.cache import SessionCache
from corolla.swarm.models.checkpoint import Checkpoint, open_checkpoint
from corolla.swarm.models.client_parts import ClientParts
from corolla.swarm.models.errors import (
    BlockRangeError,
    CacheRollbackError,
    CheckpointError,
    DeviceError,
    EngineError,
    UnsupportedArchitectureError,
)
from corolla.swarm.models.family import ModelFamily, family_for, supported_model_types
from corolla.swarm.models.loading import LoadOptions, load_client_parts, load_span
from corolla.swarm.models.naming import resolve_dht_prefix
from corolla.swarm.models.span import BlockSpan

__all__ = [
    "BlockRangeError",
    "BlockSpan",
    "CacheRollbackError",
    "Checkpoint",
    "CheckpointError",
    "ClientParts",
    "DeviceError",
    "EngineError",
    "LoadOptions",
    "ModelFamily",
    "SessionCache",
    "UnsupportedArchitectureError",
    "family_for",
    "load_client_parts",
    "load_span",
    "open_checkpoint",
    "resolve_dht_prefix",
    "supported_model_types",
]
