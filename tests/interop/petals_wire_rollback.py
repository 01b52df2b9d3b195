"""Runs in the stock Petals 2.2 reference venv: an inference session rolled back with
`start_from_position`, sent by stock Petals/hivemind code exactly as Petals clients since July 2024 do
(the 2.2.0 client itself has no rollback API). Compares logits with the local model.

Usage: python petals_wire_rollback.py MODEL_DIR INITIAL_PEER DHT_PREFIX
"""

import asyncio
import json
import sys
import uuid

import petalsref_nonat  # noqa: F401
import torch
from hivemind import DHT, MSGPackSerializer, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from petals.server.handler import TransformerConnectionHandler
from petals.utils.dht import get_remote_module_infos
from transformers import LlamaForCausalLM

ARGS = ((b"__T0", b"__T1", b"__T2"), {})


def request(uid, hidden, **metadata):
    tensors = [serialize_torch_tensor(t) for t in (hidden, torch.zeros(0), torch.zeros(0, dtype=torch.int64))]
    return runtime_pb2.ExpertRequest(
        uid=uid,
        tensors=tensors,
        metadata=MSGPackSerializer.dumps({"args_structure": ARGS, "points": 0.0, "active_adapter": None, **metadata}),
    )


def main():
    model_dir, initial_peer, prefix = sys.argv[1:4]
    local = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    n = local.config.num_hidden_layers
    dht = DHT(initial_peers=[initial_peer], client_mode=True, start=True)
    uids = [f"{prefix}.{i}" for i in range(n)]
    infos = get_remote_module_infos(dht, uids, latest=True)
    peers = {peer for info in infos for peer in info.servers}
    assert len(peers) == 1, f"expected one server for the whole model, found {peers}"
    peer = next(iter(peers))
    prompt = torch.tensor([[1, 384, 456, 291, 441]])
    token_a, token_b = torch.tensor([[410]]), torch.tensor([[652]])
    embed = local.model.embed_tokens
    session, chain = str(uuid.uuid4()), " ".join(uids)

    async def run():
        p2p = await dht.replicate_p2p()
        stub = TransformerConnectionHandler.get_stub(p2p, peer)

        async def messages():
            yield request(chain, embed(prompt), session_id=session, step_id="1", max_length=16, start_from_position=0)
            await asyncio.sleep(0.5)
            yield request(chain, embed(token_a), session_id=session, step_id="2", start_from_position=5)
            await asyncio.sleep(0.5)
            yield request(chain, embed(token_b), session_id=session, step_id="3", start_from_position=5)
            await asyncio.sleep(0.5)
            yield runtime_pb2.ExpertRequest()

        outputs = []
        async for response in await stub.rpc_inference(messages()):
            outputs.append(deserialize_torch_tensor(response.tensors[0]))
        return outputs

    with torch.inference_mode():
        outputs = asyncio.run(asyncio.wait_for(run(), 60))
        logits_b = local.lm_head(local.model.norm(outputs[2]))[0, -1]
        expected_b = local(torch.cat([prompt, token_b], dim=1)).logits[0, -1]
        logits_a = local.lm_head(local.model.norm(outputs[1]))[0, -1]
        expected_a = local(torch.cat([prompt, token_a], dim=1)).logits[0, -1]
    diff_a = (logits_a - expected_a).abs().max().item()
    diff_b = (logits_b - expected_b).abs().max().item()
    ok = len(outputs) == 3 and diff_a < 1e-4 and diff_b < 1e-4
    print(
        json.dumps(
            {"ok": ok, "steps": len(outputs), "max_diff_before_rollback": diff_a, "max_diff_after_rollback": diff_b}
        )
    )
    dht.shutdown()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
