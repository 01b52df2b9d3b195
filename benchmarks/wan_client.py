"""The Corolla client side of benchmarks/wan_tokens_per_second.py, run inside a lab host.

Usage: python wan_client.py MODEL_DIR DHT_PREFIX INITIAL_PEER --new-tokens N
Prints one JSON line per mode: {"mode", "ms_per_token", "tokens_per_s", "exact", "route", speculation stats}.
Modes: no push (the client waits for each server in turn), push, push + speculation on a "rewrite"
prompt (a paragraph given, then its start again) and on a free prompt, and the default client ("auto":
push and speculation where they pay, route_choice.py) on both prompts. Greedy; every output is
checked against the local model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

import corolla
from client_tokens_per_second import auto_choice
from corolla.swarm import steptrace

DEFAULT = object()  # the client's own choice of speculation (no prompt_lookup_num_tokens passed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("dht_prefix")
    parser.add_argument("initial_peers", nargs="+")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", default="", help="comma-separated subset of the modes (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    local = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    paragraph = torch.randint(6, 500, (1, 24), generator=torch.Generator().manual_seed(7))
    prompts = {
        "free": torch.tensor([[1, 384, 456]]),
        "rewrite": torch.cat([paragraph, paragraph[:, :4]], dim=1),
    }
    want = {
        name: local.generate(
            ids, max_new_tokens=args.new_tokens, do_sample=False, attention_mask=torch.ones_like(ids), eos_token_id=None
        )
        for name, ids in prompts.items()
    }
    modes = [
        ("no_push", "free", False, None),
        ("push", "free", True, None),
        # The same, timed until the sessions have closed too (as generate() did before it closed them
        # in the background): the same-run baseline of what a close costs the caller.
        ("push_close_awaited", "free", True, None),
        ("push_speculative_free", "free", True, 8),
        ("push_rewrite", "rewrite", True, None),
        ("push_speculative_rewrite", "rewrite", True, 8),
        # The default client: push and speculation where they pay on this route (route_choice.py).
        ("auto", "free", None, DEFAULT),
        ("auto_rewrite", "rewrite", None, DEFAULT),
    ]
    if args.modes:
        modes = [m for m in modes if m[0] in args.modes.split(",")]
    remote = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        args.model_dir, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, request_timeout=30.0
    )
    try:
        route = remote.wait_for_route(120, interval=2.0)  # the servers may still be announcing
        for mode, prompt_name, push, draft in modes:
            remote.client_config.use_server_to_server = push
            steptrace.mark("mode", name=mode)  # benchmarks/wan_trace.py splits the trace by mode
            ids = prompts[prompt_name]
            options = {} if draft is DEFAULT else {"prompt_lookup_num_tokens": draft}
            remote.generate(ids, max_new_tokens=4, eos_token_id=[], prompt_lookup_num_tokens=None)  # warm-up
            runs, out = [], None
            held_back, sent_late = remote.view.copies.held_back, remote.view.copies.sent_late
            for _ in range(3):
                started = time.perf_counter()
                out = remote.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[], **options)
                if mode == "push_close_awaited":
                    remote._loop.wait_background()
                runs.append(time.perf_counter() - started)
            seconds = sorted(runs)[1]
            stats = remote.speculation.stats if remote.speculation is not None else None
            report = {
                "mode": mode,
                "prompt": prompt_name,
                "ms_per_token": round(1000 * seconds / args.new_tokens, 1),
                "tokens_per_s": round(args.new_tokens / seconds, 2),
                "exact": bool(torch.equal(out, want[prompt_name])),
                "route": route,
            }
            if stats is not None:
                report |= {"draft_steps": stats.steps, "drafted": stats.drafted, "accepted": stats.accepted}
            copies = remote.view.copies  # the client's copies of pushed steps, held back / sent late (copies.py)
            report["copies_held_back"] = copies.held_back - held_back
            report["copies_sent_late"] = copies.sent_late - sent_late
            if push is None:  # what the default client chose per hop, and the round trips it chose on
                report["choice"] = auto_choice(remote)
            print(json.dumps(report), flush=True)
    finally:
        remote.close()


if __name__ == "__main__":
    main()
