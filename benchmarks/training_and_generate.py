"""The Python API's costs, measured in one run on the tiny reference Llama with 2 servers:

- training step (forward + backward, batch 8 x 64 tokens, ptune): Corolla's client and servers vs
  the stock Petals 2.2 client and servers (target: Corolla's step time <= 0.5x Petals');
- transformers' generate() through the swarm vs stepping a session by hand (embed, session step,
  head, argmax), greedy tokens/s (target: >= 0.95x of the hand loop).

Usage (as root, preferably in a loopback-only namespace):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/training_and_generate.py'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corolla
from corolla.swarm.peers import start_dht
from tests.support.swarm import PetalsServer, make_reference_model, reference_python, run_reference_script, start_chain

PREFIX = "bench-llama-hf"
CHAIN = ["0:2", "2:4"]
BATCH, LENGTH, PRE_SEQ_LEN = 8, 64, 4
SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "interop" / "petals_train_step.py"


def connect(model: Path, peer: str, **options) -> corolla.AutoDistributedModelForCausalLM:
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers=[peer], dht_prefix=PREFIX, use_relay=False, auto_nat=False, **options
    )


def corolla_training_step(model: Path, peer: str, steps: int) -> float:
    with connect(model, peer, tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN) as remote:
        ids = torch.randint(6, 500, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
        times = []
        for _ in range(steps + 1):  # the first step (routing, connections) is not counted
            started = time.perf_counter()
            remote(input_ids=ids, labels=ids).loss.backward()
            times.append(time.perf_counter() - started)
            remote.zero_grad()
        return statistics.median(times[1:])


def petals_training_step(model: Path, tmp: Path, steps: int) -> float:
    bootstrap = start_dht(use_relay=False, auto_nat=False)
    servers = []
    try:
        maddr = str(bootstrap.get_visible_maddrs()[0])
        servers = [PetalsServer(tmp, model, maddr, blocks, PREFIX, name=f"petals-{blocks}") for blocks in CHAIN]
        for server in servers:
            server.wait_started()
        args = [str(model), maddr, PREFIX, "ptune", str(PRE_SEQ_LEN), str(BATCH), str(LENGTH), str(steps + 1)]
        result = run_reference_script(SCRIPT, *args, timeout=600)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(result.stderr[-2000:])
        return json.loads(lines[-1])["step_s"]
    finally:
        for server in servers:
            server.stop()
        bootstrap.shutdown()


def generate_vs_hand_loop(model: Path, peer: str, new_tokens: int, repeats: int) -> dict:
    prompt = torch.tensor([[1, 384, 456]])
    with connect(model, peer) as remote:

        def via_generate() -> torch.Tensor:
            return remote.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=[])

        @torch.inference_mode()
        def by_hand() -> torch.Tensor:
            tokens = prompt
            with remote.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
                to_send = prompt
                for _ in range(new_tokens):
                    hidden = session.step(remote.client_parts.embed(to_send))
                    to_send = remote.client_parts.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)
                    tokens = torch.cat([tokens, to_send], dim=1)
            return tokens

        assert torch.equal(via_generate(), by_hand())  # warm-up, and the same tokens
        times: dict[str, list[float]] = {"generate": [], "hand_loop": []}
        for _ in range(repeats):  # interleaved, so that machine noise hits both alike
            for name, fn in (("generate", via_generate), ("hand_loop", by_hand)):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    tps = {name: new_tokens / statistics.median(runs) for name, runs in times.items()}
    return {
        "generate_tokens_per_s": round(tps["generate"], 1),
        "hand_loop_tokens_per_s": round(tps["hand_loop"], 1),
        "generate_over_hand_loop": round(tps["generate"] / tps["hand_loop"], 3),
        "target_generate_over_hand_loop": 0.95,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-petals", action="store_true")
    args = parser.parse_args()
    report: dict = {"batch": BATCH, "length": LENGTH, "pre_seq_len": PRE_SEQ_LEN, "servers": len(CHAIN)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_reference_model(tmp / "model", PREFIX)
        servers = start_chain(tmp, model, CHAIN, "--dht-prefix", PREFIX, name="corolla")
        try:
            report.update(generate_vs_hand_loop(model, servers[0].maddr, args.new_tokens, args.repeats))
            report["corolla_training_step_s"] = round(corolla_training_step(model, servers[0].maddr, args.steps), 4)
        finally:
            for server in servers:
                server.stop()
        if not args.skip_petals and reference_python().exists():
            report["petals_training_step_s"] = round(petals_training_step(model, tmp, args.steps), 4)
            report["corolla_over_petals_step_time"] = round(
                report["corolla_training_step_s"] / report["petals_training_step_s"], 3
            )
            report["target_corolla_over_petals_step_time"] = 0.5
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
