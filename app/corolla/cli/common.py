"""What the commands share: argument types, the model source arguments, usage errors, the running node's client."""

from __future__ import annotations

import argparse
import os
import sys

from corolla.api.client import NodeError


def progress(text: str) -> None:
    print(f"corolla: {text}", file=sys.stderr, flush=True)


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"blocks must look like START:END, got {text!r}") from exc
    if start < 0 or end <= start:
        raise argparse.ArgumentTypeError(f"{text} is empty or reversed: give START:END with 0 <= START < END")
    return start, end


def parsed(text: str, parse, expected: str):
    """`parse(text)`, or argparse's clear error naming what was expected."""
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from exc


def positive_int(text: str) -> int:
    value = parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    value = parsed(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    value = parsed(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def peer_maddr(text: str) -> str:
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


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
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


def check_model_argument(model: str) -> None:
    """An existing file is no model (a folder or a hub repo id is): say so, not "not found on the hub"."""

    if os.path.isfile(model):
        hint = "; convert it first with: corolla model import" if model.lower().endswith(".gguf") else ""
        raise UsageError(f"{model} is a file; a model is a folder (config.json and weights) or a hub repo id{hint}")


class UsageError(Exception):
    """A mistake in the command line: one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C so that every `finally` (DHT shutdown, sessions) runs."""


def running_node_client(paths=None):
    """The running node's synchronous client (corolla/api/client.py); NodeError when none runs."""
    from corolla.api.client import SyncNodeClient
    from corolla.node.instance import find_running_node
    from corolla.node.paths import NodePaths

    address = find_running_node(paths or NodePaths.default())
    if address is None:
        raise NodeError("no Corolla node is running (start one with: corolla node)")
    return SyncNodeClient(address.url, address.token())


def node_call(method: str, path: str, body: dict | None = None, timeout: float = 30):
    return running_node_client().call(method, path, body, timeout=timeout)
