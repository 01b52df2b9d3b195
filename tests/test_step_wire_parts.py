"""Pieces of a token step's path made cheaper, checked against what they replace: the plain tensor
decoding against hivemind's, and the spot checks' kept outputs (a growing buffer) against the
concatenation they replace, including the snapshots checks hold while the session goes on."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from corolla.swarm import wire
from corolla.swarm.client.verification import _Kept
from corolla.swarm.server.packing import BadRequest, deserialize_tensors


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3, 8),
        torch.randn(1, 1, 16).half(),
        torch.arange(5, dtype=torch.int64),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(2, 0, 4),
        torch.tensor(3.5),
        torch.randn(1, 2, 4).requires_grad_(),
    ],
    ids=["float32", "float16", "int64", "empty", "empty_ids", "no_positions", "scalar", "requires_grad"],
)
def test_plain_decoding_gives_what_hivemind_gives(tensor: torch.Tensor):
    proto = serialize_torch_tensor(tensor.detach().requires_grad_(tensor.requires_grad))
    ours, theirs = wire.deserialize_plain(proto), deserialize_torch_tensor(proto)
    assert (ours.dtype, ours.shape, ours.requires_grad) == (theirs.dtype, theirs.shape, theirs.requires_grad)
    assert torch.equal(ours.detach(), theirs.detach())
    if ours.numel():
        ours.detach().add_(1)  # writable, and a copy: the message's bytes stay as sent
    assert torch.equal(wire.deserialize_plain(proto).detach(), theirs.detach())


@pytest.mark.parametrize(
    "proto",
    [
        serialize_torch_tensor(torch.randn(2, 4).to(torch.bfloat16)),
        serialize_torch_tensor(torch.randn(2, 4), runtime_pb2.CompressionType.FLOAT16),
    ],
    ids=["bfloat16", "compressed"],
)
def test_other_encodings_go_through_hivemind(proto: runtime_pb2.Tensor):
    assert torch.equal(wire.deserialize_plain(proto), deserialize_torch_tensor(proto))


@pytest.mark.parametrize("buffer", [b"\0" * 12, b"\0" * 17, b""], ids=["short", "ragged", "empty"])
def test_plain_decoding_refuses_a_buffer_that_does_not_match_its_shape(buffer: bytes):
    proto = runtime_pb2.Tensor(buffer=buffer, size=[2, 2, 2], dtype="float32")
    with pytest.raises((ValueError, RuntimeError)):
        wire.deserialize_plain(proto)
    # ... and a server refuses the request before it decodes it
    with pytest.raises(BadRequest):
        deserialize_tensors([proto])


def test_kept_outputs_grow_in_place_and_equal_the_concatenation():
    steps = [torch.randn(2, n, 4) for n in (3, 1, 1, 4, 1, 1, 1, 2)]
    kept = _Kept(steps[0], known_from=5)
    for step in steps[1:]:
        kept.append(step)
    assert torch.equal(kept.outputs, torch.cat(steps, dim=1))
    assert kept.end == 5 + sum(s.shape[1] for s in steps)
    assert torch.equal(steps[0], steps[0].clone())  # the first reply itself is never written to


def test_a_checks_snapshot_of_kept_outputs_survives_appends_rollbacks_and_reorderings():
    kept = _Kept(torch.randn(2, 2, 4), known_from=0)
    for _ in range(3):
        kept.append(torch.randn(2, 1, 4))
    snapshot, expected = kept.outputs, kept.outputs.clone()
    kept.append(torch.randn(2, 1, 4))  # the session goes on: past the snapshot
    assert torch.equal(snapshot, expected)
    kept.outputs = kept.outputs[:, :3]  # a rollback into the snapshot's positions, then new outputs there
    kept.append(torch.full((2, 2, 4), 7.0))
    assert torch.equal(snapshot, expected)
    assert torch.equal(kept.outputs, torch.cat([expected[:, :3], torch.full((2, 2, 4), 7.0)], dim=1))
    before = kept.outputs.clone()
    kept.outputs = kept.outputs[torch.tensor([1, 0])]  # beams reordered
    kept.append(torch.zeros(2, 1, 4))
    assert torch.equal(kept.outputs, torch.cat([before[[1, 0]], torch.zeros(2, 1, 4)], dim=1))
    assert torch.equal(snapshot, expected)
