"""The `corolla` command line."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time

from corolla import __version__
from corolla.executable import corolla_command
from corolla.units import human_bytes


def _parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"blocks must look like START:END, got {text!r}") from exc
    return start, end


def _add_model_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face repo id or a local model folder")
    parser.add_argument("--token", default=None, help="Hugging Face token for gated models")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--torch-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def cmd_model_info(args: argparse.Namespace) -> int:
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


def cmd_model_generate(args: argparse.Namespace) -> int:
    """Greedy generation through locally loaded spans: the engine end to end, no swarm involved."""
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
    from corolla.swarm.server.config import ServerConfig
    from corolla.swarm.server.server import serve

    if not args.initial_peers and not args.new_swarm:
        print(
            "corolla: error: give --initial-peers MADDR... to join a swarm, or --new-swarm to start one",
            file=sys.stderr,
        )
        return 2
    host_maddrs = args.host_maddrs or [f"/ip4/0.0.0.0/tcp/{args.port}"]
    announce_maddrs = list(args.announce_maddrs)
    if args.public_ip:
        if not args.port:
            print("corolla: error: --public-ip needs --port (the port forwarded to this computer)", file=sys.stderr)
            return 2
        version = "ip6" if ":" in args.public_ip else "ip4"
        announce_maddrs.append(f"/{version}/{args.public_ip}/tcp/{args.port}")
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
    )
    return serve(config)


def _default_throughput_cache() -> str:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "corolla", "throughput.json")


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="contribute a span of blocks to a swarm (headless)")
    _add_model_source_args(serve)
    swarm = serve.add_argument_group("swarm")
    swarm.add_argument("--initial-peers", nargs="+", default=[], metavar="MADDR")
    swarm.add_argument("--new-swarm", action="store_true", help="start a new swarm (prints how others join)")
    swarm.add_argument("--dht-prefix", default=None)
    swarm.add_argument("--port", type=int, default=0, help="TCP port to listen on (0: any)")
    swarm.add_argument("--host-maddrs", nargs="+", default=None, metavar="MADDR")
    swarm.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR")
    swarm.add_argument("--public-ip", default=None, help="your router's public IP, with --port forwarded to you")
    swarm.add_argument(
        "--reachability",
        choices=["auto", "direct", "relay"],
        default="auto",
        help="auto: ask peers whether they can dial this computer (default); direct or relay: skip the check",
    )
    swarm.add_argument("--identity-path", default=None, help="keeps the peer id stable across restarts")
    swarm.add_argument("--public-name", default=None)
    swarm.add_argument("--nat-port-map", action="store_true", help="ask the router for a port (NAT-PMP/UPnP)")
    swarm.add_argument("--no-relay", action="store_true")
    swarm.add_argument("--no-auto-relay", action="store_true")
    swarm.add_argument("--no-auto-nat", action="store_true")
    blocks = serve.add_argument_group("blocks").add_mutually_exclusive_group()
    blocks.add_argument("--blocks", type=_parse_blocks, default=None, metavar="START:END")
    blocks.add_argument("--num-blocks", type=int, default=None, metavar="N")
    model = serve.add_argument_group("model and limits")
    model.add_argument("--quant-type", default="none", choices=["none", "int8", "nf4"])
    model.add_argument("--cache-dir", default=None)
    model.add_argument("--inference-max-length", type=int, default=None)
    model.add_argument("--max-batch-size", type=int, default=None, help="tokens per request")
    model.add_argument("--attn-cache-tokens", type=int, default=None, help="KV cache budget per block, in tokens")
    model.add_argument("--throughput", type=_throughput, default="auto", help="auto, eval or tokens/s")
    model.add_argument("--throughput-cache", default=_default_throughput_cache())
    model.add_argument("--update-period", type=float, default=120.0)
    model.add_argument("--balance-quality", type=float, default=0.75)
    model.add_argument("--mean-balance-check-period", type=float, default=60.0)
    model.add_argument("--step-timeout", type=float, default=300.0)
    model.add_argument("--session-timeout", type=float, default=1800.0)
    model.add_argument("--num-threads", type=int, default=None)
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


def _add_client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--no-relay", action="store_true")
    parser.add_argument("--no-auto-nat", action="store_true")
    parser.add_argument("--request-timeout", type=float, default=30.0)


def cmd_chat(args: argparse.Namespace) -> int:
    from corolla.swarm.client.chat import ChatSession
    from corolla.swarm.client.generation import sampling_kwargs
    from corolla.swarm.client.remote_model import AutoDistributedModelForCausalLM

    config = _client_config(args)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        torch_dtype=args.torch_dtype,
        token=args.token,
        revision=args.revision,
        client_config=config,
    )
    chat = ChatSession(model, system_prompt=args.system, max_length=args.max_length)
    sampling = sampling_kwargs(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.seed)

    def answer(text: str) -> None:
        reply = chat.send(
            text,
            max_new_tokens=args.max_new_tokens,
            stop=args.stop,
            on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
            **sampling,
        )
        print(
            f"\n-- {reply.tokens} tokens, {reply.tokens_per_second:.1f} tokens/s, stopped by {reply.stopped_by}",
            file=sys.stderr,
        )

    try:
        if args.prompt is not None:
            answer(args.prompt)
            return 0
        print(
            f"Chatting with {args.model} through the swarm (route: {model.route()}). Empty line or Ctrl-D quits.",
            file=sys.stderr,
        )
        while True:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip():
                break
            answer(text)
        return 0
    finally:
        chat.close()
        model.close()


def cmd_swarm(args: argparse.Namespace) -> int:
    from corolla.swarm.client.health import format_health, read_swarm_health
    from corolla.swarm.client.remote_model import _LoopThread
    from corolla.swarm.peers import start_dht

    extra = {}
    for item in args.model or []:
        prefix, _, blocks = item.rpartition(":")
        if not prefix or not blocks.isdigit():
            print(f"corolla: error: --model takes PREFIX:NUM_BLOCKS, got {item!r}", file=sys.stderr)
            return 2
        extra[prefix] = int(blocks)
    dht = start_dht(args.initial_peers, client_mode=True, use_relay=not args.no_relay, auto_nat=not args.no_auto_nat)
    loop = _LoopThread()
    try:
        p2p = loop.run(dht.replicate_p2p(), timeout=60)
        models = loop.run(read_swarm_health(dht, p2p, extra), timeout=120)
        if args.json:
            print(json.dumps([m.to_dict() for m in models], indent=2))
        else:
            print(format_health(models))
        return 0
    finally:
        loop.stop()
        dht.shutdown()


def cmd_node(args: argparse.Namespace) -> int:
    from corolla.node.service import run_node

    return run_node(port=args.port)


def _node_call(method: str, path: str) -> dict:
    import urllib.error
    import urllib.request

    from corolla.node.instance import find_running_node
    from corolla.node.paths import NodePaths

    address = find_running_node(NodePaths.default())
    if address is None:
        raise _NoNode("no Corolla node is running (start one with: corolla node)")
    request = urllib.request.Request(
        f"{address.url}{path}", method=method, headers={"Authorization": f"Bearer {address.token()}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _NoNode(f"the node answered {exc.code}: {exc.read()[:300].decode(errors='replace')}") from exc


class _NoNode(Exception):
    pass


def cmd_status(args: argparse.Namespace) -> int:
    try:
        status = _node_call("GET", "/api/status")
    except _NoNode as exc:
        print(f"corolla: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    c = status["contribution"]
    blocks = f"blocks {c['start_block']}:{c['end_block']}" if c.get("start_block") is not None else "no blocks"
    print(f"node {status['version']} (pid {status['pid']}), model {status['model']}, swarm {status['swarm']}")
    print(
        f"contribution: {c['state']} — {c['reason']}; {blocks}; {c['tokens_served']} tokens served; "
        f"{c['sessions_active']} active sessions; restarts {c['restarts']}"
    )
    print(f"secrets: {status['secrets_storage']}")
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
    os.environ["COROLLA_HOME"] = home
    try:
        demo = argparse.Namespace(prompt="self-test", max_new_tokens=4, timeout=300.0, keep=False)
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
        shutil.rmtree(home, ignore_errors=True)
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
        print("starting a Corolla node ...", file=sys.stderr)
    try:
        deadline = time.monotonic() + args.timeout
        status = None
        while time.monotonic() < deadline:
            try:
                status = _node_call("GET", "/api/status")
                if status["contribution"]["state"] == "online":
                    break
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
        tokens, began = 0, time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    piece = chunk.get("choices", [{}])[0].get("delta", {}).get("content")
                    if piece:
                        tokens += 1
                        sys.stdout.write(piece)
                        sys.stdout.flush()
        print(f"\n-- {tokens} pieces in {time.perf_counter() - began:.2f} s (random weights: the text is noise)")
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
    parser = argparse.ArgumentParser(prog="corolla", description="Join and use a Petals swarm.")
    parser.add_argument("--version", action="version", version=f"corolla {__version__}")
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="in a temporary home: build the demo model, serve it, answer one chat, exit 0",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    demo.add_argument("--prompt", default="Hello, swarm!")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--timeout", type=float, default=180.0)
    demo.add_argument("--keep", action="store_true", help="leave the node running afterwards")
    demo.set_defaults(func=cmd_demo)

    chat = commands.add_parser("chat", help="chat with a model through the swarm (terminal)")
    _add_model_source_args(chat)
    _add_client_args(chat)
    chat.add_argument("--dht-prefix", default=None)
    chat.add_argument("--prompt", default=None, help="answer this once and exit")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--max-length", type=int, default=2048, help="tokens one session may hold")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=None)
    chat.add_argument("--repetition-penalty", type=float, default=1.0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--stop", nargs="*", default=None, help="stop sequences")
    chat.set_defaults(func=cmd_chat)

    swarm = commands.add_parser("swarm", help="the swarm's health: coverage and servers of every model")
    _add_client_args(swarm)
    swarm.add_argument(
        "--model",
        nargs="*",
        metavar="PREFIX:NUM_BLOCKS",
        help="also check these models (for swarms that do not announce a model index)",
    )
    swarm.add_argument("--json", action="store_true")
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

    generate = model_commands.add_parser("generate", help="greedy generation through locally loaded spans")
    _add_model_source_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--spans", type=int, default=2, help="split the blocks into this many spans")
    generate.add_argument("--quant-type", default="none", choices=["none", "int8", "nf4"])
    generate.add_argument("--raw", action="store_true", help="do not apply the chat template")
    generate.set_defaults(func=cmd_model_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except Exception as exc:
        if not isinstance(exc, _user_error_types()):
            raise
        print(f"corolla: error: {exc}", file=sys.stderr)
        return 2


def _user_error_types() -> tuple[type, ...]:
    """The errors that are the user's to fix (one line, exit 2). Only from modules already loaded:
    importing them would pull torch and hivemind into every command, the window's included."""
    names = (
        ("corolla.swarm.models.errors", "EngineError"),
        ("corolla.swarm.client.routing", "MissingBlocksError"),
        ("corolla.swarm.client.session", "ServerFailure"),
    )
    return tuple(getattr(sys.modules[module], name) for module, name in names if module in sys.modules)


if __name__ == "__main__":
    sys.exit(main())
