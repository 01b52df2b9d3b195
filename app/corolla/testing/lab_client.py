"""A Corolla swarm client run inside a lab host: greedy generation through the swarm vs the local model.

Usage: python lab_client.py MODEL_DIR DHT_PREFIX INITIAL_PEER... [--new-tokens 64]
Prints one JSON line: {"exact": bool, "new_tokens": n, "generate_s": s, "tokens_per_s": x, "route": str}.
Default client settings (relays on, as a user at home gets them): no network flags at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import corolla


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("dht_prefix")
    parser.add_argument("initial_peers", nargs="+")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    parser.add_argument("--request-timeout", type=float, default=20.0)
    parser.add_argument("--blocked", nargs="*", default=[], help="peer ids the client must not route through")
    parser.add_argument("--allowed", nargs="*", default=None, help="the only peer ids the client may route through")
    parser.add_argument(
        "--until-usable", action="store_true", help="poll until a short generation succeeds; print when (wall clock)"
    )
    args = parser.parse_args()
    if args.until_usable:
        return wait_until_usable(args)
    torch.set_num_threads(1)
    ids = torch.randint(6, 500, (1, 6), generator=torch.Generator().manual_seed(0))
    local = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    want = local.generate(
        ids,
        max_new_tokens=args.new_tokens,
        do_sample=False,
        attention_mask=torch.ones_like(ids),
        eos_token_id=None,
        pad_token_id=3,
    )
    remote = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        args.model_dir,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        request_timeout=args.request_timeout,
        max_retries=12,
        blocked_servers=args.blocked,
        allowed_servers=args.allowed,
    )
    try:
        try:  # the servers' announcements may still be on their way
            route = remote.wait_for_route(args.connect_timeout, interval=2.0)
        except Exception as exc:
            print(json.dumps({"exact": False, "error": f"no route: {exc!r}"}), flush=True)
            return 1
        print(json.dumps({"generating": route}), flush=True)  # a fault test waits for this line
        started = time.perf_counter()
        got = remote.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
        elapsed = time.perf_counter() - started
        links = remote.view.direct_links  # which servers got this client's steps over a direct link
        direct = {"direct_links": [p.to_base58() for p in links.opened]}
        direct["direct_link_failed"] = [p.to_base58() for p in links.failed_recently()]
        copies = remote.view.copies  # the client's copies of pushed steps (client/copies.py)
        direct["copies"] = {"held_back": copies.held_back, "sent_late": copies.sent_late}
    finally:
        remote.close()
    exact = torch.equal(got, want)
    report = {
        "exact": exact,
        "new_tokens": int(got.shape[1] - ids.shape[1]),
        "generate_s": round(elapsed, 3),
        "tokens_per_s": round(args.new_tokens / elapsed, 2),
        "route": route,
        **direct,
    }
    print(json.dumps(report), flush=True)
    return 0 if exact else 1


def wait_until_usable(args: argparse.Namespace) -> int:
    """For benchmarks: started before the server, reports the wall-clock time its blocks first worked."""
    ids = torch.tensor([[7, 8, 9]])
    remote = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        args.model_dir,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        request_timeout=10.0,
        max_retries=1,
    )
    print(json.dumps({"ready_at": time.time()}), flush=True)
    deadline = time.monotonic() + args.connect_timeout
    error = None
    try:
        while time.monotonic() < deadline:
            try:
                remote.route()
                remote.generate(ids, max_new_tokens=2, eos_token_id=[])
                print(json.dumps({"usable_at": time.time()}), flush=True)
                return 0
            except Exception as exc:
                error = exc
                time.sleep(1.0)
    finally:
        remote.close()
    print(json.dumps({"usable_at": None, "error": repr(error)[:500]}), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
