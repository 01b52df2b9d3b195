"""Typed step metadata: the maps a client encodes are byte for byte those Petals' client sends, and a
server's one decode bounds and types every key, tolerates unknown ones and passes them on in a push."""

from __future__ import annotations

import pytest
from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol
from corolla.swarm.client.streams import ARGS_STRUCTURE, MASKED_ARGS_STRUCTURE
from corolla.swarm.step_metadata import CallMetadata, ForwardReply, MetadataError, StepMetadata

CHAIN = (("QmA", "s1", 0, 2), ("QmB", "s2", 2, 4))


def test_inference_steps_encode_as_petals_maps():
    first = {
        "session_id": "sid",
        "step_id": "st",
        "points": 0.0,
        "args_structure": ARGS_STRUCTURE,
        "start_from_position": 0,
        "max_length": 128,
        "active_adapter": None,
    }
    typed = StepMetadata(
        session_id="sid", step_id="st", args_structure=ARGS_STRUCTURE, start_from_position=0, max_length=128
    )
    assert typed.pack() == MSGPackSerializer.dumps(first)  # the protocol doc's first step (appendix A)
    later = {
        "session_id": "sid",
        "step_id": "st",
        "points": 0.0,
        "args_structure": MASKED_ARGS_STRUCTURE,
        "start_from_position": 7,
        "next_servers": list(CHAIN),
        "corolla_upstream": "QmU",
    }
    typed = StepMetadata(
        session_id="sid",
        step_id="st",
        args_structure=MASKED_ARGS_STRUCTURE,
        start_from_position=7,
        next_servers=CHAIN,
        upstream="QmU",
    )
    assert typed.pack() == MSGPackSerializer.dumps(later)
    assert StepMetadata.decode(typed.pack()) == typed


def test_forward_and_backward_encode_as_petals_maps():
    structure = ((b"__T0", b"__T1"), {})
    petals = {"args_structure": structure, "points": 0.0, "active_adapter": None}
    assert CallMetadata(args_structure=structure).pack() == MSGPackSerializer.dumps(petals)
    corolla = {**petals, "active_adapter": "lora", protocol.GRAD_PREFIX_KEY: 2, "corolla_graph": "g"}
    typed = CallMetadata(args_structure=structure, active_adapter="lora", graph="g", grad_prefix=2)
    assert typed.pack() == MSGPackSerializer.dumps(corolla)
    assert CallMetadata.decode(typed.pack()) == typed
    assert ForwardReply(graph_kept=True).pack() == MSGPackSerializer.dumps({protocol.GRAPH_KEPT_KEY: True})
    assert ForwardReply().pack() == b"" and ForwardReply.decode(b"\xc1") == ForwardReply()


def test_a_pushed_copy_keeps_what_the_client_sent():
    sent = {"session_id": "s0", "step_id": "st", "points": 0.0, "next_servers": [list(e) for e in CHAIN], "new": 1}
    step = StepMetadata.decode(MSGPackSerializer.dumps(sent))
    assert step.extra == {"new": 1}  # unknown keys are tolerated, as Petals does
    pushed = step.pushed_on("s1", step.next_servers[1:])
    expected = {**sent, "session_id": "s1", "next_servers": [CHAIN[1]], "pushed": True}
    assert MSGPackSerializer.loads(pushed.pack()) == expected


@pytest.mark.parametrize(
    "bad, error",
    [
        ({"step_id": 5}, "step_id"),
        ({"session_id": "x" * 200}, "session_id"),
        ({"max_length": -1}, "max_length"),
        ({"max_length": 1.5}, "max_length"),
        ({"start_from_position": True}, "start_from_position"),
        ({"alloc_timeout": "1"}, "alloc_timeout"),
        ({"active_adapter": 3}, "adapter 3 not found"),
    ],
)
def test_a_step_the_server_refuses(bad, error):
    with pytest.raises(MetadataError, match=error):
        StepMetadata.decode(MSGPackSerializer.dumps(bad))


def test_malformed_extensions_only_switch_themselves_off():
    assert StepMetadata.from_map({"next_servers": [("QmA", "s", 3, 1)]}).next_servers is None
    assert StepMetadata.from_map({"next_servers": "QmA"}).next_servers is None
    assert StepMetadata.from_map({"corolla_upstream": 5, "pushed": 1}) == StepMetadata(points=None)
    assert CallMetadata.from_map({"corolla_graph": "x" * 65}).graph is None
    with pytest.raises(MetadataError, match="positive int"):
        CallMetadata.from_map({protocol.GRAD_PREFIX_KEY: 0})
    with pytest.raises(MetadataError, match="map"):
        StepMetadata.decode(MSGPackSerializer.dumps([1]))
    with pytest.raises(MetadataError, match="bytes"):
        StepMetadata.decode(b"\x80" * (protocol.MAX_METADATA_BYTES + 1))
