"""The `corolla` command line."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time

from corolla import __version__
from corolla.executable import corolla_command
from corolla.units import human_bytes

CHAT_STOP_GRACE_S = 2.0  # a step that does not end this long after Ctrl-C is abandoned


def _progress(text: str) -> None:
    print(f"corolla: {text}", file=sys.stderr, flush=True)


def _parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"blocks must look like START:END, got {text!r}") from exc
    if start < 0 or end <= start:
        raise argparse.ArgumentTypeError(f"{text} is empty or reversed: give START:END with 0 <= START < END")
    return start, end


def _parsed(text: str, parse, expected: str):
    """`parse(text)`, or argparse's clear error naming what was expected."""
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from exc


def _positive_int(text: str) -> int:
    value = _parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _parsed(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _parsed(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _peer_maddr(text: str) -> str:
    """A multiaddr that names a peer: /ip4/HOST/tcp/PORT/p2p/PEER_ID (checked before anything starts)."""
    from hivemind.utils.multiaddr import Multiaddr

    example = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooW..."
    try:
        maddr = Multiaddr(text)
    except Exception as exc:
        reason = str(exc).split(":", 1)[-1].strip() if "protocol" in str(exc) else "not a multiaddr"
        raise argparse.ArgumentTypeError(f"{text!r}: {reason} (expected like {example})") from exc
    if "p2p" not in [protocol.name for protocol in maddr.protocols()]:
        raise argparse.ArgumentTypeError(f"{text!r} has no /p2p/PEER_ID part (expected like {example})")
    return text


def _add_model_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face repo id or a local model folder")
    parser.add_argument("--token", default=None, help="Hugging Face token for gated models")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument(
        "--torch-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="the weights' type in memory (auto: the checkpoint's, float32 on a CPU for half types)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def cmd_model_info(args: argparse.Namespace) -> int:
    _check_model_argument(args.model)
    from corolla.swarm.models import open_checkpoint, resolve_dht_prefix
    from corolla.swarm.models.devices import checkpoint_dtype_of, dtype_name, resolve_device, resolve_dtype
    from corolla.swarm.models.errors import EngineError
    from corolla.swarm.models.loading import estimate_memory

    checkpoint = open_checkpoint(args.model, token=args.token, revision=args.revision)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.torch_dtype, device, checkpoint_dtype_of(checkpoint.config))
    estimate = estimate_memory(checkpoint, dtype, args.quant_type)
    try:
        prefix = resolve_dht_prefix(checkpoint, args.dht_prefix)
    except EngineError as exc:
        prefix = None
        prefix_note = str(exc)
    info = {
        "model": checkpoint.source_name,
        "model_type": checkpoint.config.model_type,
        "family": checkpoint.family.name,
        "num_blocks": checkpoint.num_blocks,
        "hidden_size": checkpoint.config.hidden_size,
        "dht_prefix": prefix,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "quant_type": args.quant_type,
        "bytes_per_block": max(estimate.per_block_bytes),
        "client_bytes": estimate.client_bytes,
        "total_bytes": estimate.total_bytes,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if "bytes" in key:
            value = human_bytes(value)
        print(f"{key:16} {value}")
    if prefix is None:
        print(f"{'':16} ({prefix_note})")
    return 0


def cmd_model_make_tiny(args: argparse.Namespace) -> int:
    from corolla.swarm.models.tiny import PRESETS, make_tiny_model

    if args.preset not in PRESETS:
        print(
            f"corolla: error: unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}",
            file=sys.stderr,
        )
        return 2

    out = make_tiny_model(args.preset, args.out_dir, num_layers=args.layers, seed=args.seed, dht_prefix=args.dht_prefix)
    print(out)
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    """GGUF file -> checkpoint folder (safetensors shards, config with dht_prefix, tokenizer)."""
    from pathlib import Path

    from corolla.swarm.models.gguf_import import import_gguf

    source = Path(args.gguf_file)
    out = Path(args.out_dir) if args.out_dir else Path.cwd() / source.name.removesuffix(".gguf").replace(".", "-")
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    result = import_gguf(
        source, out, torch_dtype=args.torch_dtype, force=args.force, dht_prefix=args.dht_prefix, progress=progress
    )
    size = sum(item.stat().st_size for item in result.folder.iterdir() if item.is_file())
    print(result.folder)
    print(
        f"-- {result.model_type}, {result.num_parameters / 1e6:.0f} M parameters stored as {result.torch_dtype} "
        f"({human_bytes(size)}), DHT prefix {result.dht_prefix}; licence: {result.source.get('license') or 'unknown'}\n"
        f"-- serve it with: corolla serve {result.folder} --new-swarm",
        file=sys.stderr,
    )
    return 0


def cmd_model_generate(args: argparse.Namespace) -> int:
    """Greedy generation through locally loaded spans: the engine end to end, no swarm involved."""
    _check_model_argument(args.model)
    import torch
    from transformers import AutoTokenizer

    from corolla.swarm.models import LoadOptions, load_client_parts, load_span, open_checkpoint

    checkpoint = open_checkpoint(args.model, token=args.token, revision=args.revision)
    options = LoadOptions(
        device=args.device,
        dtype=args.torch_dtype,
        quantization=args.quant_type,
        token=args.token,
        revision=args.revision,
    )
    client = load_client_parts(checkpoint, LoadOptions(device=args.device, dtype=args.torch_dtype))
    n = checkpoint.num_blocks
    parts = max(1, min(args.spans, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    spans = [load_span(checkpoint, a, b, options) for a, b in itertools.pairwise(bounds)]
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.fetch_tokenizer_files()))
    if tokenizer.chat_template and not args.raw:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template).input_ids
    caches = [span.new_cache() for span in spans]
    generated: list[int] = []
    started = time.perf_counter()
    current = ids
    printed = ""
    for _ in range(args.max_new_tokens):
        hidden = client.embed(current)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache)
        token = int(client.logits(hidden)[0, -1].float().argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        decoded = tokenizer.decode(generated, skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(decoded[len(printed) :])
            sys.stdout.flush()
            printed = decoded
        current = torch.tensor([[token]])
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    routes = ", ".join(f"[{s.start}:{s.end})" for s in spans)
    print(
        f"-- {len(generated)} tokens in {elapsed:.2f} s ({len(generated) / max(elapsed, 1e-9):.1f} tokens/s) "
        f"through spans {routes}",
        file=sys.stderr,
    )
    return 0


def _throughput(text: str) -> float | str:
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
    from corolla.memory import cap_malloc_arenas

    cap_malloc_arenas()  # before any thread allocates: memory.py says why
    # Checked before anything heavy is imported or loaded.
    if not args.initial_peers and not args.new_swarm:
        raise UsageError("give --initial-peers MADDR... to join a swarm, or --new-swarm to start one")
    if args.initial_peers and args.new_swarm:
        raise UsageError("--new-swarm starts a swarm of its own: drop it, or drop --initial-peers")
    _check_model_argument(args.model)
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


def _check_model_argument(model: str) -> None:
    """An existing file is no model (a folder or a hub repo id is): say so, not "not found on the hub"."""
    import os

    if os.path.isfile(model):
        hint = "; convert it first with: corolla model import" if model.lower().endswith(".gguf") else ""
        raise UsageError(f"{model} is a file; a model is a folder (config.json and weights) or a hub repo id{hint}")


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="contribute a span of blocks to a swarm (headless)")
    _add_model_source_args(serve)
    swarm = serve.add_argument_group("swarm")
    swarm.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MADDR",
        type=_peer_maddr,
        help="join the swarm through these peers (multiaddrs ending in /p2p/PEER_ID)",
    )
    swarm.add_argument("--new-swarm", action="store_true", help="start a new swarm (prints how others join)")
    swarm.add_argument(
        "--dht-prefix", default=None, help="the model's name on the DHT (default: from the model's config or name)"
    )
    swarm.add_argument("--port", type=_port, default=0, help="TCP port to listen on (0: any)")
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
    swarm.add_argument("--no-auto-relay", action="store_true", help="do not look for a relay when unreachable")
    swarm.add_argument("--no-auto-nat", action="store_true", help="do not ask peers whether this server is reachable")
    blocks = serve.add_argument_group("blocks").add_mutually_exclusive_group()
    blocks.add_argument(
        "--blocks", type=_parse_blocks, default=None, metavar="START:END", help="serve exactly these blocks"
    )
    blocks.add_argument(
        "--num-blocks",
        type=_positive_int,
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
    model.add_argument(
        "--inference-max-length", type=_positive_int, default=None, help="the longest session, in tokens"
    )
    model.add_argument("--max-batch-size", type=_positive_int, default=None, help="tokens per request")
    model.add_argument(
        "--attn-cache-tokens", type=_positive_int, default=None, help="KV cache budget per block, in tokens"
    )
    model.add_argument("--throughput", type=_throughput, default="auto", help="auto, eval or tokens/s")
    model.add_argument(
        "--throughput-cache", default=None, help="where measured throughputs are kept (default: Corolla's cache)"
    )
    model.add_argument("--update-period", type=_positive_float, default=120.0, help="seconds between DHT announcements")
    model.add_argument(
        "--balance-quality", type=float, default=0.75, help="move to other blocks below this swarm balance (0..1)"
    )
    model.add_argument(
        "--mean-balance-check-period", type=_positive_float, default=60.0, help="seconds between balance checks"
    )
    model.add_argument(
        "--step-timeout", type=_positive_float, default=300.0, help="seconds one inference step may take"
    )
    model.add_argument(
        "--session-timeout", type=_positive_float, default=1800.0, help="seconds a session may stay open"
    )
    model.add_argument(
        "--max-open-sessions", type=_positive_int, default=256, help="inference sessions that reserve cache"
    )
    model.add_argument("--num-threads", type=_positive_int, default=None, help="torch threads for the blocks")
    model.add_argument("--stats-file", default=None, help="write live counters here (JSON, every second)")
    model.add_argument("--exit-with-parent", action="store_true", help="stop when the starting process dies")
    serve.set_defaults(func=cmd_serve)


def _client_config(args: argparse.Namespace):
    from corolla.swarm.client.config import ClientConfig

    return ClientConfig(
        initial_peers=args.initial_peers,
        dht_prefix=getattr(args, "dht_prefix", None),
        use_relay=not args.no_relay,
        auto_nat=not args.no_auto_nat,
        request_timeout=args.request_timeout,
    )


def _add_client_args(parser: argparse.ArgumentParser, peers_required: bool = True) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        required=peers_required,
        metavar="MADDR",
        type=_peer_maddr,
        help="any peers of the swarm (multiaddrs ending in /p2p/PEER_ID)",
    )
    parser.add_argument("--no-relay", action="store_true", help="neither use nor offer libp2p relays")
    parser.add_argument(
        "--no-auto-nat", action="store_true", help="do not ask peers whether this computer is reachable"
    )
    parser.add_argument(
        "--request-timeout", type=_positive_float, default=30.0, help="seconds to wait for a server's answer"
    )


def _chat_privacy(args: argparse.Namespace):
    """--trusted-only: only the servers named in --initial-peers and --trusted-peers receive the chat's
    hidden states; --trusted-peers alone: only those. None: any server."""
    if not args.trusted_only and args.trusted_peers is None:
        return None
    from corolla.swarm.client.privacy import Privacy

    if args.trusted_only:
        return Privacy.members(
            [*(maddr.rsplit("/p2p/", 1)[-1] for maddr in args.initial_peers), *(args.trusted_peers or ())]
        )
    return Privacy.only(args.trusted_peers)


def cmd_chat(args: argparse.Namespace) -> int:
    _check_model_argument(args.model)
    _progress(f"joining the swarm through {' '.join(args.initial_peers)} ...")  # before the slow imports
    import logging

    from corolla.swarm.client.chat import ChatSession
    from corolla.swarm.client.generation import sampling_kwargs
    from corolla.swarm.client.remote_model import AutoDistributedModelForCausalLM

    # The client's own warnings (a server failing, routing retries) as progress lines; hivemind is quiet.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="corolla: %(message)s")
    config = _client_config(args)
    privacy = _chat_privacy(args)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        torch_dtype=args.torch_dtype,
        # The client's own parts (embeddings, head) are small: the CPU unless a device is named.
        device="cpu" if args.device == "auto" else args.device,
        token=args.token,
        revision=args.revision,
        client_config=config,
        privacy=privacy,
    )
    if privacy is not None:
        _progress(f"privacy: {privacy}: no other server receives this chat's hidden states")
    chat = ChatSession(model, system_prompt=args.system, max_length=args.max_length)
    sampling = sampling_kwargs(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)

    def answer(text: str) -> bool:
        """One reply. Ctrl-C stops it (True: interrupted); a second Ctrl-C, or a first one that the
        current step does not honour within a moment, abandons the step."""
        interrupted = threading.Event()
        force_after = threading.Timer(CHAT_STOP_GRACE_S, _thread.interrupt_main)
        force_after.daemon = True

        def on_interrupt(signum, frame) -> None:
            if interrupted.is_set():
                raise KeyboardInterrupt
            interrupted.set()
            force_after.start()

        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            reply = chat.send(
                text,
                max_new_tokens=args.max_new_tokens,
                stop=args.stop,
                on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                should_stop=interrupted.is_set,
                **sampling,
            )
        except KeyboardInterrupt as exc:
            if isinstance(exc, _Terminated):
                raise
            print("\n-- stopped (the next message starts a new session)", file=sys.stderr)
            return True
        finally:
            force_after.cancel()
            signal.signal(signal.SIGINT, previous)
        stopped_by = "Ctrl-C" if reply.stopped_by == "cancelled" else reply.stopped_by
        print(
            f"\n-- {reply.tokens} tokens, {reply.tokens_per_second:.1f} tokens/s, stopped by {stopped_by}",
            file=sys.stderr,
        )
        return interrupted.is_set()

    try:
        _progress(f"looking for servers of {model.dht_prefix} ...")
        route = _find_route(model)
        if args.prompt is not None:
            return 130 if answer(args.prompt) else 0
        print(
            f"Chatting with {args.model} through the swarm (route: {route}). Empty line or Ctrl-D quits; "
            "Ctrl-C stops a reply.",
            file=sys.stderr,
        )
        while True:
            try:
                text = input("> ")
            except EOFError:
                break
            except KeyboardInterrupt as exc:  # Ctrl-C at the prompt: quit, as Ctrl-D does
                if isinstance(exc, _Terminated):
                    raise
                print(file=sys.stderr)
                break
            if not text.strip():
                break
            answer(text)
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            chat.close()
            model.close()


def _find_route(model, attempts: int = 6) -> str:
    """The route a session would take now; waits a little (saying so) for servers still joining, and
    says at once when nobody announces the model at all."""
    from corolla.swarm.client.routing import MissingBlocksError, PrivacyCoverageError
    from corolla.swarm.client.session import NOBODY_SERVES_ATTEMPTS

    for attempt in range(attempts):
        try:
            return model.route()
        except MissingBlocksError as exc:
            if isinstance(exc, PrivacyCoverageError):
                raise  # the trusted servers cannot cover the model: waiting would not change that
            if not model.view.announced and attempt >= NOBODY_SERVES_ATTEMPTS - 1:
                raise MissingBlocksError(exc.blocks, model.dht_prefix, nobody=True) from None
            if attempt == attempts - 1:
                raise
            delay = min(0.5 * 2**attempt, 5.0)
            _progress(f"{exc}; looking again in {delay:.0f} s ({attempt + 1}/{attempts - 1})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def cmd_swarm(args: argparse.Namespace) -> int:
    from corolla.swarm.client.client_loop import ClientLoop
    from corolla.swarm.client.health import format_health, read_swarm_health
    from corolla.swarm.peers import start_dht

    if args.action == ["lan"]:
        return _swarm_lan(args.json)
    if args.action:
        return _swarm_check(args.action)
    if not args.initial_peers:
        print("corolla: error: the following arguments are required: --initial-peers", file=sys.stderr)
        return 2
    extra = {}
    for item in args.model or []:
        prefix, _, blocks = item.rpartition(":")
        if not prefix or not blocks.isdigit():
            print(f"corolla: error: --model takes PREFIX:NUM_BLOCKS, got {item!r}", file=sys.stderr)
            return 2
        extra[prefix] = int(blocks)
    dht = start_dht(args.initial_peers, client_mode=True, use_relay=not args.no_relay, auto_nat=not args.no_auto_nat)
    loop = ClientLoop()
    p2p = None
    try:
        p2p = loop.run(dht.replicate_p2p(), timeout=60)
        models = loop.run(read_swarm_health(dht, p2p, extra), timeout=120)
        flagged = _flagged_servers()
        if args.json:
            print(json.dumps([m.to_dict() for m in models], indent=2))
        else:
            print(format_health(models, flagged))
        return 0
    finally:
        if p2p is not None:
            with contextlib.suppress(Exception):
                loop.run(p2p.shutdown(), timeout=10)
        loop.stop()
        dht.shutdown()


def _flagged_servers() -> dict[str, dict]:
    """Servers this computer's node caught returning wrong results (its database; none if no node ran)."""
    from corolla.node.paths import NodePaths

    path = NodePaths.default().database
    if not path.exists():
        return {}
    try:
        from corolla.node.db import Database

        db = Database(path)
        try:
            return db.flagged_servers()
        finally:
            db.close()
    except Exception:  # a database another version wrote, or locked: the health view still works
        return {}


LAN_LISTEN_S = 3.0  # mDNS answers to a fresh query arrive within about a second


def _swarm_lan(as_json: bool) -> int:
    """`corolla swarm lan`: listen a few seconds for private swarms announced on this network."""
    from corolla.node.lan_discovery import LanDiscovery

    try:
        lan = LanDiscovery()
    except OSError as exc:
        print(f"corolla: cannot listen on the local network: {exc}", file=sys.stderr)
        return 1
    try:
        time.sleep(LAN_LISTEN_S)
        swarms = lan.swarms()
    finally:
        lan.close()
    if as_json:
        print(json.dumps([s.to_dict() for s in swarms], indent=2))
    elif not swarms:
        print("No Corolla swarm is announced on this network.")
    else:
        for swarm in swarms:
            print(f"{swarm.name}: {swarm.model} ({len(swarm.peers)} address(es))\n  join: {swarm.invite}")
    return 0


def _swarm_check(action: list[str]) -> int:
    """`corolla swarm check PEER`: the running node checks one server on purpose."""
    if len(action) != 2 or action[0] != "check":
        print("corolla: error: usage: corolla swarm check PEER_ID", file=sys.stderr)
        return 2
    try:
        result = _node_call("POST", "/api/swarm/check", {"peer_id": action[1]}, timeout=200)
    except _NoNode as exc:
        print(f"corolla: {exc}", file=sys.stderr)
        return 1
    compared = ", ".join(result.get("compared_with") or []) or "nothing"
    print(f"{result['state']}: {result['detail']} (compared with {compared})")
    return 0 if result["state"] != "flagged" else 3


def cmd_node(args: argparse.Namespace) -> int:
    if not sys.stderr.isatty():
        # A log file (the window's node, `corolla demo`, a service): progress bars there are thousands of
        # carriage-return frames; the status says what the node is doing instead. Set before anything
        # imports tqdm (it reads TQDM_* when imported); inherited by the block server the node starts.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    from corolla.memory import cap_malloc_arenas
    from corolla.node.service import run_node

    cap_malloc_arenas()
    return run_node(port=args.port)


def _node_call(method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
    import urllib.error
    import urllib.request

    from corolla.node.instance import find_running_node
    from corolla.node.paths import NodePaths

    address = find_running_node(NodePaths.default())
    if address is None:
        raise _NoNode("no Corolla node is running (start one with: corolla node)")
    headers = {"Authorization": f"Bearer {address.token()}"}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(f"{address.url}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _NoNode(f"the node answered {exc.code}: {exc.read()[:300].decode(errors='replace')}") from exc


class _NoNode(Exception):
    pass


def cmd_status(args: argparse.Namespace) -> int:
    try:
        status = _node_call("GET", "/api/status")
    except _NoNode as exc:
        if args.json:  # scripts parse stdout: the same answer, in the format they asked for
            print(json.dumps({"running": False, "error": str(exc)}, indent=2))
        print(f"corolla: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"running": True, **status}, indent=2))
        return 0
    c = status["contribution"]
    blocks = f"blocks {c['start_block']}:{c['end_block']}" if c.get("start_block") is not None else "no blocks"
    print(f"node {status['version']} (pid {status['pid']}), model {status['model']}, swarm {status['swarm']}")
    print(
        f"contribution: {c['state']} — {c['reason']}; {blocks}; {c['tokens_served']} tokens served; "
        f"{c['sessions_active']} active sessions; restarts {c['restarts']}"
    )
    card = status.get("model_card")
    if card:
        size = f", {card['parameters'] / 1e6:.0f} M parameters" if card.get("parameters") else ""
        disk = f", {human_bytes(card['folder_bytes'])} on disk" if card.get("folder_bytes") else ""
        print(f"model: {card['name']}{size}{disk}; licence {card['license']}; weights: {card['source']}")
    if status.get("model_preparing"):
        print("model: converting the default model (first start; about a minute)")
    print(f"secrets: {status['secrets_storage']}")
    sharing = status.get("sharing")
    if sharing:
        print(f"who can join: {sharing['sentence']}")
        if sharing.get("port_notice"):
            print(f"  {sharing['port_notice']}")
        if sharing["choice"] == "others":
            print(f"  {sharing['outside_sentence']}")
            for fix in sharing.get("fixes") or []:
                print(f"  - {fix}")
    if status.get("invite"):
        print(f"invite others to this private swarm with: {status['invite']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        print(_node_call("POST", "/api/shutdown")["message"])
    except _NoNode as exc:
        print(f"corolla: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from corolla.node.paths import NodePaths
    from corolla.uninstall import uninstall

    paths = NodePaths.default()
    if args.user_data and not args.yes:
        folders = ", ".join(sorted({str(paths.config_dir), str(paths.data_dir), str(paths.cache_dir)}))
        answer = input(f"Delete Corolla's settings, chat history, stats and caches ({folders})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    for line in uninstall(paths, remove_user_data=args.user_data) or ["nothing to clear"]:
        print(line)
    return 0


def self_test() -> int:
    """The smoke test of every package: everything end to end, nothing left behind."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    home = tempfile.mkdtemp(prefix="corolla-self-test-")
    previous = os.environ.get("COROLLA_HOME")
    previous_model = os.environ.get("COROLLA_DEFAULT_MODEL")
    os.environ["COROLLA_HOME"] = home
    # The real default model, converted from scratch in the temporary home: the answer must be right.
    os.environ["COROLLA_DEFAULT_MODEL"] = "smollm2"
    try:
        demo = argparse.Namespace(
            prompt="What is the capital of France?", max_new_tokens=24, timeout=900.0, keep=False, expect="Paris"
        )
        code = cmd_demo(demo)
        if code != 0:  # say why before the evidence is deleted
            for log in sorted(Path(home).rglob("*.log")):
                print(f"--- {log.relative_to(home)} (last lines) ---", file=sys.stderr)
                print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), file=sys.stderr)
    finally:
        if previous is None:
            os.environ.pop("COROLLA_HOME", None)
        else:
            os.environ["COROLLA_HOME"] = previous
        if previous_model is None:
            os.environ.pop("COROLLA_DEFAULT_MODEL", None)
        else:
            os.environ["COROLLA_DEFAULT_MODEL"] = previous_model
        shutil.rmtree(home, ignore_errors=True)
    sys.stdout.flush()  # the answer's last line first, then the verdict
    print(f"corolla self-test: {'passed' if code == 0 else 'FAILED'}", file=sys.stderr)
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a node (unless one runs), wait for its block server, chat once through the OpenAI endpoint,
    show the swarm and the stats: everything end to end on the offline demo model."""
    import subprocess
    import time
    import urllib.request

    from corolla.node.instance import find_running_node
    from corolla.node.paths import NodePaths

    paths = NodePaths.default().ensure()
    started = None
    if find_running_node(paths) is None:
        with open(paths.data_dir / "node.log", "ab") as log:
            started = subprocess.Popen(
                corolla_command("node"),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        print(f"starting a Corolla node (its log: {paths.data_dir / 'node.log'}) ...", file=sys.stderr)
    try:
        began = time.monotonic()
        deadline = began + args.timeout
        status, said, said_at = None, None, began
        while time.monotonic() < deadline:
            try:
                status = _node_call("GET", "/api/status")
                if status["contribution"]["state"] == "online":
                    break
                # What the node is doing, when it changes, and every 15 s while it takes long (the first
                # start converts the model for about a minute): never a silent wait.
                reason = status["contribution"]["reason"] or status["contribution"]["state"]
                now = time.monotonic()
                if reason != said or now - said_at >= 15:
                    elapsed = f" ({now - began:.0f} s so far)" if reason == said else ""
                    print(f"corolla: {reason}{elapsed}", file=sys.stderr, flush=True)
                    said, said_at = reason, now
                if status["contribution"]["state"] == "failed":  # e.g. the model could not be prepared
                    print(f"corolla: the node failed: {status['contribution']['reason']}", file=sys.stderr)
                    return 1
            except _NoNode:
                pass
            time.sleep(1)
        else:
            print(f"corolla: the node did not come online in {args.timeout:.0f} s: {status}", file=sys.stderr)
            return 1
        c = status["contribution"]
        print(
            f"model: {status['model']}; contributing blocks {c['start_block']}:{c['end_block']} to the "
            f"{status['swarm']} swarm"
        )
        address = find_running_node(paths)
        body = json.dumps(
            {
                "model": status["model"],
                "messages": [{"role": "user", "content": args.prompt}],
                "max_tokens": args.max_new_tokens,
                "temperature": 0,
                "stream": True,
            }
        ).encode()
        request = urllib.request.Request(
            f"{address.url}/v1/chat/completions",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {address.token()}", "Content-Type": "application/json"},
        )
        print(f"> {args.prompt}")
        tokens, began, reply = 0, time.perf_counter(), []
        with urllib.request.urlopen(request, timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    piece = chunk.get("choices", [{}])[0].get("delta", {}).get("content")
                    if piece:
                        tokens += 1
                        reply.append(piece)
                        sys.stdout.write(piece)
                        sys.stdout.flush()
        card = status.get("model_card") or {}
        noise = " (random weights: the text is noise)" if card.get("random_weights") else ""
        print(f"\n-- {tokens} pieces in {time.perf_counter() - began:.2f} s{noise}")
        if card:
            print(f"model card: {card['name']}, {card['license']}; weights: {card['source']}")
        expect = getattr(args, "expect", None)
        if expect and expect not in "".join(reply):
            print(f"corolla: the answer does not contain {expect!r}", file=sys.stderr)
            return 1
        for model in _node_call("GET", "/api/swarm"):
            for server in model["servers"]:
                mine = " (this computer)" if server.get("this_computer") else ""
                print(
                    f"swarm: {model['dht_prefix']} blocks {server['start_block']}:{server['end_block']} "
                    f"{server['state']} {server['throughput']:.0f} tok/s ping {server['ping_ms']} ms{mine}"
                )
        time.sleep(1.5)  # the block server publishes its counters every second
        served = _node_call("GET", "/api/status")["contribution"]["tokens_served"]
        print(f"stats: this computer has served {served} tokens since its block server started")
        return 0
    except _NoNode as exc:
        print(f"corolla: {exc}", file=sys.stderr)
        return 1
    finally:
        if started is not None and not args.keep:
            with contextlib.suppress(_NoNode):
                _node_call("POST", "/api/shutdown")
            started.wait(60)


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from corolla.gui.app import main as app_main
    except ImportError as exc:
        print(f"corolla: the window needs PySide6 (pip install 'corolla[gui]'): {exc}", file=sys.stderr)
        return 2
    return app_main([sys.argv[0]])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="corolla", description="Join and use a Petals swarm.")
    parser.add_argument("--version", action="version", version=f"corolla {__version__}")
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="in a temporary home: build the demo model, serve it, answer one chat, exit 0",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_serve_parser(commands)

    node = commands.add_parser("node", help="run the local daemon (API on 127.0.0.1)")
    node.add_argument("--port", type=int, default=0, help="0: any free port (written to the node's lock file)")
    node.set_defaults(func=cmd_node)
    status = commands.add_parser("status", help="what the running node is doing")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    commands.add_parser("stop", help="stop the running node").set_defaults(func=cmd_stop)
    uninstall = commands.add_parser(
        "uninstall", help="before removing the app: stop the node, drop the login entry (and user data)"
    )
    uninstall.add_argument("--user-data", action="store_true", help="also delete settings, history, stats, secrets")
    uninstall.add_argument("--yes", action="store_true", help="do not ask before deleting user data")
    uninstall.set_defaults(func=cmd_uninstall)
    commands.add_parser("app", help="the desktop window and tray icon").set_defaults(func=cmd_app)
    demo = commands.add_parser("demo", help="end to end on this computer: node, private swarm, chat, stats")
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--timeout", type=float, default=900.0, help="the first start converts the model")
    demo.add_argument("--keep", action="store_true", help="leave the node running afterwards")
    demo.set_defaults(func=cmd_demo)

    chat = commands.add_parser("chat", help="chat with a model through the swarm (terminal)")
    _add_model_source_args(chat)
    _add_client_args(chat)
    chat.add_argument("--dht-prefix", default=None, help="the model's name on the DHT (default: from its config)")
    chat.add_argument("--prompt", default=None, help="answer this once and exit")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", type=_positive_int, default=256, help="the longest reply, in tokens")
    chat.add_argument("--max-length", type=_positive_int, default=2048, help="tokens one session may hold")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    chat.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens up to this mass")
    chat.add_argument("--top-k", type=_positive_int, default=None, help="sample from this many likeliest tokens")
    chat.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats")
    chat.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    chat.add_argument("--stop", nargs="*", default=None, help="stop sequences")
    chat.add_argument(
        "--trusted-only",
        action="store_true",
        help="send this chat's hidden states only to the servers named in --initial-peers and --trusted-peers "
        "(every server that receives them can read the text back; fails at once, naming the blocks, if they "
        "cannot run the whole model)",
    )
    chat.add_argument(
        "--trusted-peers",
        nargs="*",
        metavar="PEER_ID",
        default=None,
        help="only these servers (peer ids or multiaddrs ending in /p2p/PEER_ID) receive the chat's hidden states",
    )
    chat.set_defaults(func=cmd_chat)

    swarm = commands.add_parser("swarm", help="the swarm's health: coverage and servers of every model")
    _add_client_args(swarm, peers_required=False)  # `corolla swarm check PEER` asks the running node
    swarm.add_argument(
        "--model",
        nargs="*",
        metavar="PREFIX:NUM_BLOCKS",
        help="also check these models (for swarms that do not announce a model index)",
    )
    swarm.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of text")
    swarm.add_argument(
        "action",
        nargs="*",
        metavar="check PEER_ID | lan",
        help="check PEER_ID: the running node sends one server known inputs and compares its outputs; "
        "lan: list the private swarms other computers on this network announce",
    )
    swarm.set_defaults(func=cmd_swarm)

    model = commands.add_parser("model", help="inspect, build and run models locally")
    model_commands = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    info = model_commands.add_parser("info", help="family, blocks, DHT prefix and memory per block")
    _add_model_source_args(info)
    info.add_argument("--quant-type", default="none", choices=["none", "int8", "nf4"])
    info.add_argument("--dht-prefix", default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_model_info)

    tiny = model_commands.add_parser("make-tiny", help="write a tiny random-weight model (tests, demo)")
    # Checked in the command, not here: listing the presets imports torch, and every `corolla`
    # start (the window's too) builds this parser.
    tiny.add_argument("preset", help="a model family preset: llama, mistral, qwen2, ... (wrong names list them)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--layers", type=int, default=6)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dht-prefix", default=None)
    tiny.set_defaults(func=cmd_model_make_tiny)

    gguf = model_commands.add_parser(
        "import", help="convert a GGUF file into a checkpoint folder Corolla and Petals servers can serve"
    )
    gguf.add_argument("gguf_file", help="a .gguf file (llama, mistral, qwen2/3, gemma2/3, phi3, falcon, bloom, ...)")
    gguf.add_argument("out_dir", nargs="?", default=None, help="the folder to create (default: the file's name here)")
    gguf.add_argument(
        "--torch-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="dtype of the stored weights (auto: bfloat16 for quantized files, else the file's own)",
    )
    gguf.add_argument("--dht-prefix", default=None, help="default: from the file name (e.g. SmolLM2-135M-Q4_1-hf)")
    gguf.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    gguf.set_defaults(func=cmd_model_import)

    generate = model_commands.add_parser("generate", help="greedy generation through locally loaded spans")
    _add_model_source_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--spans", type=int, default=2, help="split the blocks into this many spans")
    generate.add_argument("--quant-type", default="none", choices=["none", "int8", "nf4"])
    generate.add_argument("--raw", action="store_true", help="do not apply the chat template")
    generate.set_defaults(func=cmd_model_generate)
    return parser


class UsageError(Exception):
    """A mistake in the command line: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in two lines (what is wrong, where help is) instead of the whole usage."""

    def error(self, message: str):
        self.exit(2, f"corolla: error: {message}\nTry '{self.prog} --help'.\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere, also after the subcommand
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if args.self_test:
        return self_test()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if args.command not in ("serve", "node"):  # those two leave in order on SIGTERM themselves
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(f"corolla: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, (UsageError, *_user_error_types())):
            print(f"corolla: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, _runtime_error_types()):
            print(f"corolla: error: {exc}", file=sys.stderr)
            return 1
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"corolla: error: {type(exc).__name__}: {text}", file=sys.stderr)
        print("(an unexpected failure: run again with --debug for the details)", file=sys.stderr)
        return 1


class _Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C so that every `finally` (DHT shutdown, sessions) runs."""


def _interrupt(signum, frame) -> None:
    raise _Terminated


def _user_error_types() -> tuple[type, ...]:
    """The errors that are the user's to fix (one line, exit 2). Only from modules already loaded:
    importing them would pull torch and hivemind into every command, the window's included."""
    return _loaded(("corolla.swarm.models.errors", "EngineError"), ("corolla.swarm.client.privacy", "PrivacyError"))


def _runtime_error_types() -> tuple[type, ...]:
    """Failures of the swarm or the network, not of the command line (one line, exit 1)."""
    return _loaded(
        ("corolla.swarm.client.routing", "MissingBlocksError"),
        ("corolla.swarm.client.session", "ServerFailure"),
        ("corolla.swarm.peers", "PeerStartError"),
        ("corolla.node.instance", "AlreadyRunning"),
    )


def _loaded(*names: tuple[str, str]) -> tuple[type, ...]:
    return tuple(
        getattr(sys.modules[module], name)
        for module, name in names
        if module in sys.modules and hasattr(sys.modules[module], name)
    )


if __name__ == "__main__":
    sys.exit(main())
