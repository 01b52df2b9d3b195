"""Many people, one server: N concurrent greedy sessions through one server holding every block of
SmolLM2-135M-Instruct in float32, Corolla server + client, then stock Petals 2.2 server + client, in
one run. Each session is its own client process with its own prompt; all start together.

Reports aggregate tokens/s and per-session ms/token (p50, p95) for N = 1, 4, 16, with the server's
default thread settings (reported), and Corolla's client with speculation on and off.
Targets (2-core CPU): aggregate at N=16 >= 3x N=1 and >= 3x stock Petals at N=16; aggregate never
lower at N=4 or N=16 than at N=1; per-session p50 at N=16 <= 6x N=1.

Usage (as root, preferably in a loopback-only namespace):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/crowd.py'
Options: --sessions 1,4,16  --new-tokens 64  --skip-petals  --model FOLDER (a converted SmolLM2;
COROLLA_TEST_SMOLLM2 is read too)  --server-threads N (default: the server's own default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = [
    "bees", "the sea", "a lighthouse", "bread", "winter", "a robot", "the moon", "trains",
    "a garden", "rain", "mountains", "a library", "coffee", "a cat", "the desert", "music",
    "a river", "autumn", "a bicycle", "stars", "the forest", "a clock", "snow", "a market",
    "a violin", "the wind", "a bridge", "paper", "a fox", "thunder", "a kite", "glass",
]  # fmt: skip


def prompts(tokenizer, count: int) -> list[list[int]]:
    """One chat-templated prompt per session, each about something else (so no two sessions match)."""
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" number {i}")
        message = [{"role": "user", "content": f"Write a short poem about {topic}."}]
        ids = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_clients(commands: list[list[str]], env: dict[str, str], cwd: str | None = None) -> dict:
    """Start every client, wait until each has loaded and warmed up, release them together, collect."""
    clients = [
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        for command in commands
    ]
    try:
        for client in clients:
            line = client.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"client failed to start: {line}\n{client.stderr.read()[-3000:]}")
        started = time.perf_counter()
        for client in clients:
            client.stdin.write("go\n")
            client.stdin.flush()
        results = []
        for client in clients:
            line = client.stdout.readline()
            if not line.startswith("{"):
                raise RuntimeError(f"client failed: {line}\n{client.stderr.read()[-3000:]}")
            results.append(json.loads(line))
        wall = time.perf_counter() - started
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            client.wait()
    tokens = sum(r["tokens"] for r in results)
    per_token = [1000 * r["seconds"] / r["tokens"] for r in results]
    return {
        "sessions": len(commands),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "session_ms_per_token_p50": round(percentile(per_token, 0.5), 1),
        "session_ms_per_token_p95": round(percentile(per_token, 0.95), 1),
        "wall_s": round(wall, 2),
    }


def corolla_client(model: str, peer: str, prefix: str, ids: list[int], new_tokens: int, speculative: bool) -> None:
    """Client mode (a process of its own): load, warm up, say ready, wait for go, generate, print JSON."""
    import torch

    import corolla

    torch.set_num_threads(1)  # N clients share this machine's two cores with the server
    with corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model, initial_peers=[peer], dht_prefix=prefix, use_relay=False, auto_nat=False, speculative=speculative
    ) as remote:
        prompt = torch.tensor([ids])
        remote.generate(prompt, max_new_tokens=2, eos_token_id=[])  # routes, connections
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        out = remote.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=[])
        seconds = time.perf_counter() - started
    print(json.dumps({"tokens": out.shape[1] - prompt.shape[1], "seconds": seconds}), flush=True)


def converted_smollm2(tmp: Path, given: str | None) -> Path:
    folder = given or os.environ.get("COROLLA_TEST_SMOLLM2")
    if folder and (Path(folder) / "model.safetensors.index.json").is_file():
        return Path(folder)
    from corolla.node.default_model import SMOLLM2_PREFIX, bundled_gguf
    from corolla.swarm.models.gguf_import import import_gguf

    return import_gguf(bundled_gguf(), tmp / "SmolLM2-135M-Instruct", dht_prefix=SMOLLM2_PREFIX)


def corolla_rounds(tmp: Path, model: Path, args, all_prompts: list[list[int]]) -> dict:
    from corolla.testing.swarm import CorollaServer

    prefix = "crowd-corolla"
    threads = ["--num-threads", str(args.server_threads)] if args.server_threads else []
    server = CorollaServer(
        tmp,
        model,
        "--new-swarm",
        "--dht-prefix",
        prefix,
        "--torch-dtype",
        "float32",
        "--throughput",
        "50",
        "--max-batch-size",
        "2048",
        *threads,
        name="corolla-crowd",
        num_threads=None,
    )
    report: dict = {}
    try:
        peer = server.maddr
        report["server_threads"] = server.stats().get("num_threads")
        report["server_omp_wait_policy"] = server.stats().get("omp_wait_policy")
        for speculative in {"on": (True,), "off": (False,), "both": (True, False)}[args.speculation]:
            rounds = []
            for n in args.sessions:
                commands = [
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        json.dumps([str(model), peer, prefix, all_prompts[i], args.new_tokens, speculative]),
                    ]
                    for i in range(n)
                ]
                rounds.append(run_clients(commands, {**os.environ, "PYTHONUNBUFFERED": "1"}))
                print(json.dumps({"corolla": rounds[-1], "speculative": speculative}), file=sys.stderr)
            report["speculation_on" if speculative else "speculation_off"] = rounds
        stats = server.stats()
        keys = ("token_steps", "step_forwards", "joint_forwards", "batch_sizes", "sessions_peak")
        report["server_stats"] = {k: stats.get(k) for k in keys}
    finally:
        server.stop()
    return report


def petals_rounds(tmp: Path, model: Path, args, all_prompts: list[list[int]]) -> list[dict]:
    from corolla.swarm.peers import start_dht
    from corolla.testing.swarm import PetalsServer, reference_dir, reference_env, reference_python

    prefix = "crowd-petals"
    bootstrap = start_dht(use_relay=False, auto_nat=False)
    # The stock server with its own default threads too (the harness pins clients to one thread).
    server_env = {k: v for k, v in reference_env().items() if k != "OMP_NUM_THREADS"}
    server = PetalsServer(
        tmp, model, str(bootstrap.get_visible_maddrs()[0]), "0:30", prefix, name="petals-crowd", env=server_env
    )
    rounds = []
    try:
        server.wait_started()
        peer = str(bootstrap.get_visible_maddrs()[0])
        for n in args.sessions:
            commands = [
                [
                    str(reference_python()),
                    str(HERE / "crowd_petals_client.py"),
                    json.dumps([str(model), peer, prefix, all_prompts[i], args.new_tokens]),
                ]
                for i in range(n)
            ]
            rounds.append(run_clients(commands, reference_env(), cwd=str(reference_dir())))
            print(json.dumps({"petals": rounds[-1]}), file=sys.stderr)
    finally:
        server.stop()
        bootstrap.shutdown()
    return rounds


def judge(report: dict) -> dict:
    """The issue's targets, read off this run's own figures."""
    corolla = report["corolla"]
    rounds = {r["sessions"]: r for r in corolla.get("speculation_off", corolla.get("speculation_on", []))}
    verdict: dict = {}
    if 1 in rounds and 16 in rounds:
        one, many = rounds[1], rounds[16]
        verdict["n16_over_n1"] = round(many["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"], 2)
        verdict["n16_p50_over_n1_p50"] = round(many["session_ms_per_token_p50"] / one["session_ms_per_token_p50"], 2)
    if 1 in rounds:
        verdict["never_below_n1"] = all(
            r["aggregate_tokens_per_s"] >= rounds[1]["aggregate_tokens_per_s"] for r in rounds.values()
        )
    petals = {r["sessions"]: r for r in report.get("petals", [])}
    if 16 in petals and 16 in rounds:
        verdict["n16_over_petals_n16"] = round(
            rounds[16]["aggregate_tokens_per_s"] / petals[16]["aggregate_tokens_per_s"], 2
        )
    verdict["targets"] = {"n16_over_n1": 3.0, "n16_over_petals_n16": 3.0, "n16_p50_over_n1_p50_max": 6.0}
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    parser.add_argument("--server-threads", type=int, default=None)
    parser.add_argument("--skip-petals", action="store_true")
    parser.add_argument("--speculation", choices=("on", "off", "both"), default="both")
    args = parser.parse_args()
    if args.client:
        corolla_client(*json.loads(args.client))
        return
    args.sessions = [int(n) for n in args.sessions.split(",")]
    from transformers import AutoTokenizer

    from corolla.testing.swarm import reference_python

    report: dict = {"new_tokens": args.new_tokens, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = converted_smollm2(tmp, args.model)
        all_prompts = prompts(AutoTokenizer.from_pretrained(model), max(args.sessions))
        report["corolla"] = corolla_rounds(tmp, model, args, all_prompts)
        if not args.skip_petals and reference_python().exists():
            report["petals"] = petals_rounds(tmp, model, args, all_prompts)
    report["verdict"] = judge(report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
