"""Runs in the stock Petals 2.2 reference venv: multi-turn inference sessions and batched generation.

Usage: python petals_session_check.py MODEL_DIR INITIAL_PEER DHT_PREFIX
Prints one JSON line; exit code 0 iff every check passed.
"""

import json
import sys

import petalsref_clientfix  # noqa: F401  (reference harness: client close fix)
import petalsref_nonat  # noqa: F401  (reference harness: NAT port mapping off)
import torch
from petals import AutoDistributedModelForCausalLM
from transformers import AutoTokenizer, LlamaForCausalLM


def main():
    model_dir, initial_peer, prefix = sys.argv[1:4]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    local = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[initial_peer], dht_prefix=prefix, torch_dtype=torch.float32
    ).eval()
    results = {}
    with torch.inference_mode():
        # Two turns in one session: the second continues from the server-side cache.
        first = tokenizer("hello world", return_tensors="pt").input_ids
        second = tokenizer(" the quick brown fox", add_special_tokens=False, return_tensors="pt").input_ids
        with remote.inference_session(max_length=64) as session:
            turn1 = remote.generate(first, max_new_tokens=5, do_sample=False, session=session)
            turn2 = remote.generate(second, max_new_tokens=5, do_sample=False, session=session)
            results["session_position"] = session.position
        expected1 = local.generate(first, max_new_tokens=5, do_sample=False)
        expected2 = local.generate(torch.cat([expected1, second], dim=1), max_new_tokens=5, do_sample=False)
        results["turn1_match"] = torch.equal(turn1, expected1)
        results["turn2_match"] = torch.equal(turn2[:, -5:], expected2[:, -5:])
        # A batch of two equal-length prompts (Petals cannot pad).
        batch = torch.cat(
            [
                tokenizer("a petals server", return_tensors="pt").input_ids,
                tokenizer("numbers 1 2 3", return_tensors="pt").input_ids[:, :4],
            ],
            dim=0,
        )
        batch = batch[:, : min(batch.shape[1], 4)]
        got = remote.generate(batch, max_new_tokens=6, do_sample=False)
        want = local.generate(batch, max_new_tokens=6, do_sample=False)
        results["batch2_match"] = torch.equal(got, want)
    ok = results["turn1_match"] and results["turn2_match"] and results["batch2_match"]
    print(json.dumps({"ok": bool(ok), **results}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
