"""The CPU's lean decode path (corolla/swarm/models/lean_decode.py) against transformers' layers, in one
run, alternating the two so that load on the machine hits both alike. Prints JSON.

- `span_step_ms`: an in-process span step (the client_tokens_per_second model: the reference tiny Llama,
  4 blocks; and SmolLM2-135M's 30 blocks where COROLLA_TEST_SMOLLM2 names its folder), one token and a
  4-token speculative step, 64 cached tokens, one torch thread: median ms per step, per round.
- `client_tokens_per_s`: client_tokens_per_second.py's 64-token greedy generation through 1, 2 and 3
  loopback servers, each chain started twice per round, with COROLLA_LEAN_DECODE=0 and without it
  (the servers inherit the switch); `--petals` adds stock Petals on the same chains once.

Usage (as root, in a loopback-only namespace for the client part):
    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/lean_decode.py [--rounds 2] [--petals]'
(the model is the stock Petals harness's tiny Llama: the reference environment must be built, and
COROLLA_PETALSREF_SRC must name shared/reference-petals where the checkout has no shared/ beside it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from corolla.swarm.models import load_span, open_checkpoint
from corolla.swarm.models.lean_decode import LEAN_DECODE_ENV, LeanDecoder

sys.path.insert(0, str(Path(__file__).parent))
MODES = {"transformers": "0", "lean": "1"}


def step_ms(span, lean: bool, tokens: int, cached: int = 64, steps: int = 200) -> float:
    steps = max(20, steps * 4 // span.num_blocks)  # about 0.2 s a measure on a quiet machine
    os.environ[LEAN_DECODE_ENV] = MODES["lean" if lean else "transformers"]
    cache = span.new_cache()
    assert isinstance(cache.decoder, LeanDecoder) == lean
    span(torch.randn(1, cached, span.hidden_size), cache)
    x = torch.randn(1, tokens, span.hidden_size)
    for _ in range(10):
        span(x, cache)
        cache.rollback(cached)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        span(x, cache)
        times.append(time.perf_counter() - started)
        cache.rollback(cached)  # the same step again: every step sees the same cache length
    return 1000 * statistics.median(times)


def span_steps(spans: dict, rounds: int) -> dict:
    out: dict = {}
    for name, span in spans.items():
        for tokens in (1, 4):
            runs = {mode: [] for mode in MODES}
            for _ in range(rounds):
                for mode in MODES:
                    runs[mode].append(round(step_ms(span, mode == "lean", tokens), 4))
            median = {mode: statistics.median(values) for mode, values in runs.items()}
            out[f"{name}, {tokens} token{'s' if tokens > 1 else ''}"] = {
                "ms_per_round": runs,
                "median_ms": median,
                "lean_speedup": round(median["transformers"] / median["lean"], 2),
            }
    return out


def client_runs(model: Path, tmp: Path, rounds: int, new_tokens: int, petals: bool) -> dict:
    from client_tokens_per_second import CHAINS, corolla_chain, petals_chain

    runs = {n: {mode: [] for mode in MODES} for n in CHAINS}
    for _ in range(rounds):
        for n, chain in CHAINS.items():
            for mode, value in MODES.items():
                os.environ[LEAN_DECODE_ENV] = value  # the servers inherit it
                runs[n][mode].append(round(corolla_chain(tmp, model, chain, new_tokens)["auto"], 1))
    out: dict = {"tokens_per_s_per_round": runs}
    median = {n: {mode: statistics.median(v) for mode, v in by_mode.items()} for n, by_mode in runs.items()}
    out["median_tokens_per_s"] = median
    out["lean_over_transformers"] = {n: round(m["lean"] / m["transformers"], 2) for n, m in median.items()}
    for mode in MODES:
        per_token_ms = {n: 1000 / m[mode] for n, m in median.items()}
        out.setdefault("ms_per_extra_hop", {})[mode] = round((per_token_ms[3] - per_token_ms[1]) / 2, 3)
    if petals:
        from corolla.testing.swarm import reference_python

        if reference_python().exists():
            stock = {n: round(petals_chain(tmp, model, CHAINS[n], new_tokens), 1) for n in CHAINS}
            out["petals_tokens_per_s"] = stock
            out["over_petals"] = {mode: {n: round(median[n][mode] / stock[n], 2) for n in CHAINS} for mode in MODES}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2, help="client runs per chain and mode")
    parser.add_argument("--step-rounds", type=int, default=5, help="span-step rounds per mode")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--petals", action="store_true", help="also stock Petals on the same chains, once")
    parser.add_argument("--skip-client", action="store_true", help="only the in-process span steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the benchmark's servers run (CorollaServer's default)
    report: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from client_tokens_per_second import PREFIX
        from corolla.testing.swarm import make_reference_model

        model = make_reference_model(tmp / "model", PREFIX)
        spans = {"tiny Llama 0:4": load_span(open_checkpoint(model), 0, 4)}
        smollm2 = os.environ.get("COROLLA_TEST_SMOLLM2")
        if smollm2:
            spans["SmolLM2-135M 0:30"] = load_span(open_checkpoint(smollm2), 0, 30)
        report["span_step_ms"] = span_steps(spans, args.step_rounds)
        report["load_average_after_span_steps"] = [round(x, 2) for x in os.getloadavg()]
        if not args.skip_client:
            report["client"] = client_runs(model, tmp, args.rounds, args.new_tokens, args.petals)
    os.environ.pop(LEAN_DECODE_ENV, None)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
