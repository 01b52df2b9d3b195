"""The argument parser of every command, and `main()`: exit codes and one-line errors."""

from __future__ import annotations

import argparse
import signal
import sys

from corolla import __version__
from corolla.cli.chat import add_client_args, cmd_chat
from corolla.cli.common import Terminated, UsageError, add_model_source_args, positive_int
from corolla.cli.model import (
    cmd_model_block_sizes,
    cmd_model_generate,
    cmd_model_import,
    cmd_model_info,
    cmd_model_make_tiny,
)
from corolla.cli.node import cmd_app, cmd_demo, cmd_node, cmd_status, cmd_stop, cmd_uninstall, self_test
from corolla.cli.serve import add_serve_parser
from corolla.cli.swarm import cmd_swarm


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

    add_serve_parser(commands)

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
    add_model_source_args(chat)
    add_client_args(chat)
    chat.add_argument("--dht-prefix", default=None, help="the model's name on the DHT (default: from its config)")
    chat.add_argument("--prompt", default=None, help="answer this once and exit")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256, help="the longest reply, in tokens")
    chat.add_argument("--max-length", type=positive_int, default=2048, help="tokens one session may hold")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    chat.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens up to this mass")
    chat.add_argument("--top-k", type=positive_int, default=None, help="sample from this many likeliest tokens")
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
    chat.add_argument(
        "--local-blocks",
        type=int,
        default=0,
        metavar="K",
        help="run the model's first K and last K blocks on this computer, so no server receives the token "
        "embeddings or the final states (it protects little: the first server can still read most of the text "
        "back; only --trusted-only keeps it from a server)",
    )
    chat.set_defaults(func=cmd_chat)

    swarm = commands.add_parser("swarm", help="the swarm's health: coverage and servers of every model")
    add_client_args(swarm, peers_required=False)  # `corolla swarm check PEER` asks the running node
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
    add_model_source_args(info)
    info.add_argument("--quant-type", default="none", choices=["none", "int8", "nf4"])
    info.add_argument("--dht-prefix", default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_model_info)

    # The node's block plan, worked out in a short-lived process (node/hardware.py): not for people.
    model_commands.add_parser("block-sizes").set_defaults(func=cmd_model_block_sizes)

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
    add_model_source_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--spans", type=int, default=2, help="split the blocks into this many spans")
    generate.add_argument("--quant-type", default="none", choices=["none", "int8", "nf4"])
    generate.add_argument("--raw", action="store_true", help="do not apply the chat template")
    generate.set_defaults(func=cmd_model_generate)
    return parser


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
        terminated = isinstance(exc, Terminated)
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


def _interrupt(signum, frame) -> None:
    raise Terminated


def _user_error_types() -> tuple[type, ...]:
    """The errors that are the user's to fix (one line, exit 2). Only from modules already loaded:
    importing them would pull torch and hivemind into every command, the window's included."""
    return _loaded(
        ("corolla.swarm.models.errors", "EngineError"),
        ("corolla.swarm.client.privacy", "PrivacyError"),
        ("corolla.swarm.client.local_edges", "LocalEdgesError"),
    )


def _runtime_error_types() -> tuple[type, ...]:
    """Failures of the swarm or the network, not of the command line (one line, exit 1)."""
    return _loaded(
        ("corolla.swarm.client.routing", "MissingBlocksError"),
        ("corolla.swarm.client.streams", "ServerFailure"),
        ("corolla.swarm.peers", "PeerStartError"),
        ("corolla.node.instance", "AlreadyRunning"),
    )


def _loaded(*names: tuple[str, str]) -> tuple[type, ...]:
    return tuple(
        getattr(sys.modules[module], name)
        for module, name in names
        if module in sys.modules and hasattr(sys.modules[module], name)
    )
