"""Tensors and metadata in and out of Petals' protobuf messages, with a limit on every peer-controlled size.

Everything a peer sends is checked before anything is allocated: metadata size and type, tensor
count, dtype, compression, rank and byte length. A violation raises `BadRequest`, whose message the
handler returns to the peer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming

from corolla.swarm import protocol, wire
from corolla.swarm.step_metadata import CallMetadata, MetadataError, StepMetadata, decode_map

ALLOWED_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
ALLOWED_COMPRESSION = {
    runtime_pb2.CompressionType.NONE,
    runtime_pb2.CompressionType.FLOAT16,
    runtime_pb2.CompressionType.MEANSTD_16BIT,
}
MAX_TENSOR_RANK = 4
TENSOR_MARKER = b"__T"


class BadRequest(ValueError):
    """A request this server refuses; the message goes back to the peer."""


def decode_metadata(raw: bytes) -> dict[str, Any]:
    """A peer's metadata as a bounded map (step_metadata.decode_map), refused with BadRequest."""
    try:
        return decode_map(raw)
    except MetadataError as exc:
        raise BadRequest(str(exc)) from exc


def read_step(raw: bytes) -> StepMetadata:
    """An inference message's metadata, decoded and checked once; BadRequest if refused."""
    try:
        return StepMetadata.decode(raw)
    except MetadataError as exc:
        raise BadRequest(str(exc)) from exc


def read_call(raw: bytes) -> CallMetadata:
    """A forward or backward request's metadata, decoded and checked once; BadRequest if refused."""
    try:
        return CallMetadata.decode(raw)
    except MetadataError as exc:
        raise BadRequest(str(exc)) from exc


def _check_tensor(proto: runtime_pb2.Tensor) -> None:
    """Refuse a tensor whose dtype, compression, rank or buffer size is not accepted. Each protobuf field is
    read once (every tensor of every token step passes here; a field read costs about a microsecond)."""
    dtype, compression, shape = proto.dtype, proto.compression, tuple(proto.size)
    item = ALLOWED_DTYPES.get(dtype)
    if item is None:
        raise BadRequest(f"tensor dtype {dtype!r} is not accepted (use one of {', '.join(ALLOWED_DTYPES)})")
    if compression not in ALLOWED_COMPRESSION:
        raise BadRequest(f"tensor compression {compression} is not accepted")
    if len(shape) > MAX_TENSOR_RANK:
        raise BadRequest(f"tensor of rank {len(shape)} is not accepted (at most {MAX_TENSOR_RANK})")
    numel, size = math.prod(shape), len(proto.buffer)
    if compression == wire.COMPRESSION_NONE:
        if size != numel * item and not (dtype == "bfloat16" and size == numel * 4):  # legacy bf16 is 4 bytes
            raise BadRequest(f"tensor buffer of {size} bytes does not match shape {list(shape)}")
    elif compression == wire.COMPRESSION_FLOAT16 and size != numel * 2:
        raise BadRequest(f"float16 tensor buffer does not match shape {list(shape)}")


def deserialize_tensors(protos: Sequence[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    if len(protos) > protocol.MAX_TENSORS_PER_REQUEST:
        raise BadRequest(f"{len(protos)} tensors in one request (at most {protocol.MAX_TENSORS_PER_REQUEST})")
    tensors = []
    for proto in protos:
        _check_tensor(proto)
        try:
            tensors.append(wire.deserialize_plain(proto))
        except Exception as exc:
            raise BadRequest(f"tensor could not be decoded: {type(exc).__name__}: {exc}") from exc
    return tensors


def unpack_args(structure: Any, tensors: list[torch.Tensor]) -> list[Any]:
    """Rebuild the positional arguments from `args_structure` (bytes markers `__T<i>` name tensors)."""
    return unpack_args_kwargs(structure, tensors)[0]


def unpack_args_kwargs(structure: Any, tensors: list[torch.Tensor]) -> tuple[list[Any], dict[Any, Any]]:
    """Positional and keyword arguments from a request's `args_structure` ((args...), {kwargs}); Corolla
    peers send extensions (the padding mask) as keywords, which stock servers ignore. None: the tensors
    in order."""
    if structure is None:
        return list(tensors), {}

    def rebuild(node: Any, depth: int = 0) -> Any:
        if depth > 8:
            raise BadRequest("args_structure is nested too deeply")
        if isinstance(node, bytes) and node.startswith(TENSOR_MARKER):
            try:
                return tensors[int(node[len(TENSOR_MARKER) :])]
            except (ValueError, IndexError) as exc:
                raise BadRequest(f"args_structure names a tensor that was not sent: {node!r}") from exc
        if isinstance(node, (list, tuple)):
            return [rebuild(item, depth + 1) for item in node]
        if isinstance(node, dict):
            return {key: rebuild(value, depth + 1) for key, value in node.items()}
        return node

    rebuilt = rebuild(structure)
    if not (isinstance(rebuilt, list) and rebuilt and isinstance(rebuilt[0], list)):
        raise BadRequest("args_structure must be ((args...), {kwargs})")
    kwargs = rebuilt[1] if len(rebuilt) > 1 and isinstance(rebuilt[1], dict) else {}
    return rebuilt[0], kwargs


def is_dummy(tensor: Any) -> bool:
    return tensor is None or (isinstance(tensor, torch.Tensor) and tensor.numel() == 0)


def serialize(tensor: torch.Tensor, compression: int = wire.COMPRESSION_NONE) -> runtime_pb2.Tensor:
    if compression == wire.COMPRESSION_NONE:
        return wire.serialize_plain(tensor.detach().to("cpu"))  # the same bytes, without hivemind's descriptor
    return serialize_torch_tensor(tensor.detach().to("cpu"), compression, allow_inplace=True)


def stream_parts(serialized: runtime_pb2.Tensor) -> list[runtime_pb2.Tensor]:
    return list(split_for_streaming(serialized, protocol.STREAM_CHUNK_BYTES))


async def gather_stream(
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
    max_bytes: int = protocol.MAX_REQUEST_BYTES,
    max_messages: int = 256,
) -> tuple[str, CallMetadata, list[torch.Tensor]]:
    """Collect a forward/backward stream: one uid, metadata from the first message, tensor parts joined.
    (The caller bounds the time it may take.)"""
    uid, metadata, total, count = None, None, 0, 0
    groups: list[list[runtime_pb2.Tensor]] = []
    async for request in requests:
        count += 1
        if count > max_messages:
            raise BadRequest(f"a request stream of more than {max_messages} messages")
        if uid is None:
            uid = request.uid
            metadata = read_call(request.metadata)
        elif request.uid != uid:
            raise BadRequest("all messages of a stream must carry the same uid")
        for part in request.tensors:
            total += part.ByteSize()  # not just the buffer: unknown fields are kept too
            if total > max_bytes:
                raise BadRequest(f"request larger than {max_bytes} bytes")
            if part.dtype or not groups:
                if len(groups) >= protocol.MAX_TENSORS_PER_REQUEST:
                    raise BadRequest(f"more than {protocol.MAX_TENSORS_PER_REQUEST} tensors in one request")
                groups.append([part])
            else:
                groups[-1].append(part)
    if uid is None:
        raise BadRequest("empty request stream")
    joined = []
    for parts in groups:
        first = runtime_pb2.Tensor()
        first.CopyFrom(parts[0])
        first.buffer = b"".join(p.buffer for p in parts)
        joined.append(first)
    return uid, metadata, deserialize_tensors(joined)
