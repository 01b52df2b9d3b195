"""Runs in the stock Petals 2.2 reference venv: one session of benchmarks/crowd.py.

Usage: python crowd_petals_client.py '[MODEL_DIR, INITIAL_PEER, DHT_PREFIX, PROMPT_IDS, NEW_TOKENS]'
Loads, warms up, prints "ready", waits for a line on stdin, generates greedily, prints one JSON line.
"""

import json
import sys
import time

import petalsref_clientfix  # noqa: F401  (reference harness: client close fix)
import petalsref_nonat  # noqa: F401  (reference harness: NAT port mapping off)
import torch
from petals import AutoDistributedModelForCausalLM


def main():
    model_dir, peer, prefix, ids, new_tokens = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[peer], dht_prefix=prefix, torch_dtype=torch.float32
    ).eval()
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - started
    print(json.dumps({"tokens": out.shape[1] - prompt.shape[1], "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
