"""`corolla serve`: contribute a span of blocks to a swarm (headless block server)."""

from __future__ import annotations

import argparse
import os
import sys

from corolla.cli.common import (
    UsageError,
    add_model_source_args,
    check_model_argument,
    parse_blocks,
    peer_maddr,
    port_number,
    positive_float,
    positive_int,
)


def throughput_arg(text: str) -> float | str:
    if text in ("auto", "eval"):
        return text
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("throughput must be auto, eval or a number of tokens/s") from exc
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("throughput must be a finite number >= 0")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    # OpenMP's threads sleep between parallel regions instead of spinning (read once, when torch loads
    # libgomp). Spinning threads took the cores from the server's own event loop, p2pd and the user's
    # other programs, and a step then waited on a thread that had been descheduled: with two threads
    # and four sessions a step took 0.3-1.5 s instead of 0.05 s. A user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from corolla.memory import cap_malloc_arenas, import_hivemind_lightly, start_trimming

    cap_malloc_arenas()  # before any thread allocates: memory.py says why
    import_hivemind_lightly()  # before anything imports hivemind
    start_trimming()
    # Checked before anything heavy is imported or loaded.
    if not args.initial_peers and not args.new_swarm:
        raise UsageError("give --initial-peers MADDR... to join a swarm, or --new-swarm to start one")
    if args.initial_peers and args.new_swarm:
        raise UsageError("--new-swarm starts a swarm of its own: drop it, or drop --initial-peers")
    check_model_argument(args.model)
    if args.throughput_cache is None:
        from corolla.node.paths import NodePaths

        args.throughput_cache = str(NodePaths.default().cache_dir / "throughput.json")

    host_maddrs = args.host_maddrs or [f"/ip4/0.0.0.0/tcp/{args.port}"]
    announce_maddrs = list(args.announce_maddrs)
    if args.public_ip:
        if not args.port:
            print("corolla: error: --public-ip needs --port (the port forwarded to this computer)", file=sys.stderr)
            return 2
        version = "ip6" if ":" in args.public_ip else "ip4"
        announce_maddrs.append(f"/{version}/{args.public_ip}/tcp/{args.port}")
    # The reachability check first, in the background: behind NAT its answer takes seconds, which
    # overlap importing the model code and opening the model.
    from corolla.swarm.reachability import PlanInBackground

    early_plan = PlanInBackground(
        initial_peers=list(args.initial_peers),
        host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs,
        identity_path=args.identity_path,
        mode=args.reachability,
        use_relay=not args.no_relay,
        nat_port_map=args.nat_port_map,
    )

    from corolla.swarm.server.config import ServerConfig
    from corolla.swarm.server.server import serve

    config = ServerConfig(
        model=args.model,
        initial_peers=args.initial_peers,
        new_swarm=args.new_swarm,
        dht_prefix=args.dht_prefix,
        host_maddrs=host_maddrs,
        announce_maddrs=announce_maddrs,
        identity_path=args.identity_path,
        public_name=args.public_name,
        reachability=args.reachability,
        direct_links=not args.no_direct_links,
        direct_link_port=args.direct_link_port,
        nat_port_map=args.nat_port_map,
        use_relay=not args.no_relay,
        use_auto_relay=not args.no_relay and not args.no_auto_relay,
        auto_nat=not args.no_auto_nat,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        device=args.device,
        torch_dtype=args.torch_dtype,
        quant_type=args.quant_type,
        token=args.token,
        revision=args.revision,
        cache_dir=args.cache_dir,
        inference_max_length=args.inference_max_length,
        max_batch_size=args.max_batch_size,
        attn_cache_tokens=args.attn_cache_tokens,
        max_open_sessions=args.max_open_sessions,
        update_period=args.update_period,
        balance_quality=args.balance_quality,
        mean_balance_check_period=args.mean_balance_check_period,
        throughput=args.throughput,
        throughput_cache=args.throughput_cache,
        stats_path=args.stats_file,
        exit_with_parent=args.exit_with_parent,
        num_threads=args.num_threads,
        step_timeout=args.step_timeout,
        session_timeout=args.session_timeout,
        adapters=args.adapters,
    )
    return serve(config, early_plan)


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="contribute a span of blocks to a swarm (headless)")
    add_model_source_args(serve)
    swarm = serve.add_argument_group("swarm")
    swarm.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MADDR",
        type=peer_maddr,
        help="join the swarm through these peers (multiaddrs ending in /p2p/PEER_ID)",
    )
    swarm.add_argument("--new-swarm", action="store_true", help="start a new swarm (prints how others join)")
    swarm.add_argument(
        "--dht-prefix", default=None, help="the model's name on the DHT (default: from the model's config or name)"
    )
    swarm.add_argument("--port", type=port_number, default=0, help="TCP port to listen on (0: any)")
    swarm.add_argument(
        "--host-maddrs", nargs="+", default=None, metavar="MADDR", help="listen on these multiaddrs (overrides --port)"
    )
    swarm.add_argument(
        "--announce-maddrs", nargs="+", default=[], metavar="MADDR", help="tell peers to reach this server here"
    )
    swarm.add_argument("--public-ip", default=None, help="your router's public IP, with --port forwarded to you")
    swarm.add_argument(
        "--reachability",
        choices=["auto", "direct", "relay"],
        default="auto",
        help="auto: ask peers whether they can dial this computer (default); direct or relay: skip the check",
    )
    swarm.add_argument("--identity-path", default=None, help="keeps the peer id stable across restarts")
    swarm.add_argument("--public-name", default=None, help="a name shown next to this server in swarm monitors")
    swarm.add_argument("--nat-port-map", action="store_true", help="ask the router for a port (NAT-PMP/UPnP)")
    swarm.add_argument("--no-relay", action="store_true", help="neither use nor offer libp2p relays")
    swarm.add_argument(
        "--no-direct-links",
        action="store_true",
        help="Corolla clients send their steps through p2pd only (no TCP connection of their own)",
    )
    swarm.add_argument(
        "--direct-link-port", type=int, default=0, metavar="PORT", help="where direct links listen (default: any)"
    )
    swarm.add_argument("--no-auto-relay", action="store_true", help="do not look for a relay when unreachable")
    swarm.add_argument("--no-auto-nat", action="store_true", help="do not ask peers whether this server is reachable")
    blocks = serve.add_argument_group("blocks").add_mutually_exclusive_group()
    blocks.add_argument(
        "--blocks", type=parse_blocks, default=None, metavar="START:END", help="serve exactly these blocks"
    )
    blocks.add_argument(
        "--num-blocks",
        type=positive_int,
        default=None,
        metavar="N",
        help="serve N blocks where the swarm needs them most (default: as many as fit in memory)",
    )
    model = serve.add_argument_group("model and limits")
    model.add_argument(
        "--quant-type", default="none", choices=["none", "int8", "nf4"], help="quantize the blocks (CUDA only)"
    )
    model.add_argument("--cache-dir", default=None, help="where hub downloads go")
    model.add_argument(
        "--adapters", nargs="+", default=[], metavar="PATH", help="PEFT LoRA adapter folders clients may activate"
    )
    model.add_argument("--inference-max-length", type=positive_int, default=None, help="the longest session, in tokens")
    model.add_argument("--max-batch-size", type=positive_int, default=None, help="tokens per request")
    model.add_argument(
        "--attn-cache-tokens", type=positive_int, default=None, help="KV cache budget per block, in tokens"
    )
    model.add_argument("--throughput", type=throughput_arg, default="auto", help="auto, eval or tokens/s")
    model.add_argument(
        "--throughput-cache", default=None, help="where measured throughputs are kept (default: Corolla's cache)"
    )
    model.add_argument("--update-period", type=positive_float, default=120.0, help="seconds between DHT announcements")
    model.add_argument(
        "--balance-quality", type=float, default=0.75, help="move to other blocks below this swarm balance (0..1)"
    )
    model.add_argument(
        "--mean-balance-check-period", type=positive_float, default=60.0, help="seconds between balance checks"
    )
    model.add_argument("--step-timeout", type=positive_float, default=300.0, help="seconds one inference step may take")
    model.add_argument("--session-timeout", type=positive_float, default=1800.0, help="seconds a session may stay open")
    model.add_argument(
        "--max-open-sessions", type=positive_int, default=256, help="inference sessions that reserve cache"
    )
    model.add_argument("--num-threads", type=positive_int, default=None, help="torch threads for the blocks")
    model.add_argument("--stats-file", default=None, help="write live counters here (JSON, every second)")
    model.add_argument("--exit-with-parent", action="store_true", help="stop when the starting process dies")
    serve.set_defaults(func=cmd_serve)
