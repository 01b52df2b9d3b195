"""Runs in the stock Petals 2.2 reference venv: tokens/s of a greedy generation by the stock client.

Usage: python petals_generate_speed.py MODEL_DIR INITIAL_PEER DHT_PREFIX NEW_TOKENS
"""

import json
import sys
import time

import petalsref_clientfix  # noqa: F401
import petalsref_nonat  # noqa: F401
import torch
from petals import AutoDistributedModelForCausalLM


def main():
    model_dir, peer, prefix, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[peer], dht_prefix=prefix, torch_dtype=torch.float32
    ).eval()
    ids = torch.tensor([[1, 384, 456]])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up: routes, connections
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            runs.append(time.perf_counter() - started)
    print(
        json.dumps(
            {
                "tokens": out.shape[1] - ids.shape[1],
                "seconds": sorted(runs)[1],
                "tokens_per_s": (out.shape[1] - ids.shape[1]) / sorted(runs)[1],
            }
        )
    )


if __name__ == "__main__":
    main()
