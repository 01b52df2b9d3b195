"""Runs in the stock Petals 2.2 reference venv: the stock client generates greedily with a real model
(SmolLM2 converted by `corolla model import`) through the swarm, and must equal transformers 4.x's own
generate() on the same folder.

Usage: python petals_smollm2_check.py MODEL_DIR INITIAL_PEER DHT_PREFIX NEW_TOKENS
Prints one JSON line; exit code 0 iff every prompt matched.
"""

import json
import sys

import petalsref_clientfix  # noqa: F401  (reference harness: client close fix)
import petalsref_nonat  # noqa: F401  (reference harness: NAT port mapping off)
import torch
from petals import AutoDistributedModelForCausalLM
from transformers import AutoTokenizer, LlamaForCausalLM

QUESTIONS = ["What is the capital of France?", "Write a haiku about bees."]


def main():
    model_dir, initial_peer, prefix, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    local = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[initial_peer], dht_prefix=prefix, torch_dtype=torch.float32
    ).eval()
    results = []
    with torch.inference_mode():
        for question in QUESTIONS:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
            )
            options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            want = local.generate(ids, **options)
            got = remote.generate(ids, **options)
            results.append(
                {
                    "question": question,
                    "match": bool(torch.equal(got, want)),
                    "answer": tokenizer.decode(got[0, ids.shape[1] :]),
                    "local_answer": tokenizer.decode(want[0, ids.shape[1] :]),
                }
            )
    ok = all(r["match"] for r in results)
    print(json.dumps({"ok": ok, "results": results}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
