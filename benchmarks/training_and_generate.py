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
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import corolla
from corolla.swarm.peers import start_dht
from corolla.testing.swarm import (
    PetalsServer,
    make_reference_model,
    reference_dir,
    reference_env,
    reference_python,
    start_chain,
)

PREFIX = "bench-llama-hf"
CHAIN = ["0:2", "2:4"]
BATCH, LENGTH, PRE_SEQ_LEN = 8, 64, 4
SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "interop" / "petals_train_step.py"


def connect(model: Path, peer: str, **options) -> corolla.AutoDistributedModelForCausalLM:
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers=[peer], dht_prefix=PREFIX, use_relay=False, auto_nat=False, **options
    )


class PetalsTrainer:
    """The stock client in the reference venv, stepping once per line it reads (same prompts, same batch)."""

    def __init__(self, model: Path, peer: str):
        args = [str(model), peer, PREFIX, "ptune", str(PRE_SEQ_LEN), str(BATCH), str(LENGTH), "0"]
        self.process = subprocess.Popen(
            [str(reference_python()), str(SCRIPT), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=reference_env(),
            cwd=str(reference_dir()),
            start_new_session=True,
        )

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the stock Petals client exited")
            if line.startswith("{"):
                return json.loads(line)["step_s"]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def training_steps(model: Path, corolla_peer: str, petals_peer: str | None, steps: int) -> dict:
    """Step times of both clients, interleaved step by step so that machine noise hits both alike."""
    times: dict[str, list[float]] = {"corolla": [], "petals": []}
    petals = PetalsTrainer(model, petals_peer) if petals_peer else None
    try:
        with connect(model, corolla_peer, tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN) as remote:
            ids = torch.randint(6, 500, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))

            def corolla_step() -> float:
                started = time.perf_counter()
                remote(input_ids=ids, labels=ids).loss.backward()
                remote.zero_grad()
                return time.perf_counter() - started

            for step in range(steps + 1):  # the first step (routing, connections) is not counted
                for name, fn in (("corolla", corolla_step), ("petals", petals.step if petals else None)):
                    if fn is not None:
                        elapsed = fn()
                        if step:
                            times[name].append(elapsed)
    finally:
        if petals is not None:
            petals.close()
    report = {"corolla_training_step_s": round(statistics.median(times["corolla"]), 4)}
    if times["petals"]:
        report["petals_training_step_s"] = round(statistics.median(times["petals"]), 4)
        report["corolla_over_petals_step_time"] = round(
            report["corolla_training_step_s"] / report["petals_training_step_s"], 3
        )
        report["target_corolla_over_petals_step_time"] = 0.5
    return report


def start_petals(model: Path, tmp: Path) -> tuple[object, list[PetalsServer], str]:
    bootstrap = start_dht(use_relay=False, auto_nat=False)
    maddr = str(bootstrap.get_visible_maddrs()[0])
    servers = [PetalsServer(tmp, model, maddr, blocks, PREFIX, name=f"petals-{blocks}") for blocks in CHAIN]
    for server in servers:
        server.wait_started()
    return bootstrap, servers, maddr


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
        pair = (("generate", via_generate), ("hand_loop", by_hand))
        for repeat in range(repeats):
            # Interleaved, so that machine noise hits both alike, and in alternating order, so that
            # neither always runs right after the other (generate() leaves its close running behind it).
            for name, fn in pair if repeat % 2 == 0 else pair[::-1]:
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    tps = {name: new_tokens / statistics.median(runs) for name, runs in times.items()}
    # Each repeat's own ratio, then their median: a load that drifts during the run cancels out.
    paired = statistics.median(h / g for g, h in zip(times["generate"], times["hand_loop"], strict=True))
    return {
        "generate_tokens_per_s": round(tps["generate"], 1),
        "hand_loop_tokens_per_s": round(tps["hand_loop"], 1),
        "generate_over_hand_loop": round(tps["generate"] / tps["hand_loop"], 3),
        "generate_over_hand_loop_paired_median": round(paired, 3),
        "generate_repeats": repeats,
        "target_generate_over_hand_loop": 0.95,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=21, help="generate / hand-loop pairs (64 tokens each)")
    parser.add_argument("--skip-petals", action="store_true")
    args = parser.parse_args()
    report: dict = {"batch": BATCH, "length": LENGTH, "pre_seq_len": PRE_SEQ_LEN, "servers": len(CHAIN)}
    torch.set_num_threads(1)  # as the stock client and both kinds of servers run (OMP_NUM_THREADS=1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_reference_model(tmp / "model", PREFIX)
        servers = start_chain(tmp, model, CHAIN, "--dht-prefix", PREFIX, name="corolla")
        bootstrap, petals_servers = None, []
        try:
            report.update(generate_vs_hand_loop(model, servers[0].maddr, args.new_tokens, args.repeats))
            petals_peer = None
            if not args.skip_petals and reference_python().exists():
                bootstrap, petals_servers, petals_peer = start_petals(model, tmp)
            report.update(training_steps(model, servers[0].maddr, petals_peer, args.steps))
        finally:
            for server in [*servers, *petals_servers]:
                server.stop()
            if bootstrap is not None:
                bootstrap.shutdown()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
