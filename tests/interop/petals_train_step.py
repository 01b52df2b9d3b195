"""Runs in the stock Petals 2.2 reference venv: prompt-tuning training steps by the stock client.

Usage: python petals_train_step.py MODEL_DIR INITIAL_PEER DHT_PREFIX MODE PRE_SEQ_LEN BATCH LENGTH STEPS
Prints one JSON line: the first step's loss and prompt gradients, and the median step time. With
STEPS = 0 it runs one step per line read from stdin and prints each step's time (for benchmarks that
interleave it with another client's steps).
"""

import json
import sys
import time

import petalsref_clientfix  # noqa: F401  (reference harness: client close fix)
import petalsref_nonat  # noqa: F401  (reference harness: NAT port mapping off)
import torch
from petals import AutoDistributedModelForCausalLM


def main():
    model_dir, peer, prefix, mode = sys.argv[1:5]
    pre_seq_len, batch, length, steps = (int(a) for a in sys.argv[5:9])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_dir,
        initial_peers=[peer],
        dht_prefix=prefix,
        torch_dtype=torch.float32,
        tuning_mode=mode,
        pre_seq_len=pre_seq_len,
    )
    generator = torch.Generator().manual_seed(0)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for _, param in trainable:  # the same prompts in every run
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    ids = torch.randint(6, 500, (batch, length), generator=torch.Generator().manual_seed(1))
    if steps == 0:
        for _ in sys.stdin:
            started = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            print(json.dumps({"step_s": time.perf_counter() - started}), flush=True)
        return
    first, times = None, []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        times.append(time.perf_counter() - started)
        if first is None:
            first = {
                "loss": loss.item(),
                "grads": {name.split(".")[-2]: p.grad.flatten().tolist() for name, p in trainable},
            }
        for _, param in trainable:
            param.grad = None
    print(json.dumps({**first, "trainable": [n for n, _ in trainable], "step_s": sorted(times)[len(times) // 2]}))


if __name__ == "__main__":
    main()
