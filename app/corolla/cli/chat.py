"""`corolla chat`: chat with a model through the swarm in the terminal (this process is the client)."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import signal
import sys
import threading
import time

from corolla.cli.common import Terminated, check_model_argument, peer_maddr, positive_float, progress

CHAT_STOP_GRACE_S = 2.0  # a step that does not end this long after Ctrl-C is abandoned


def _client_config(args: argparse.Namespace):
    from corolla.swarm.client.config import ClientConfig

    return ClientConfig(
        initial_peers=args.initial_peers,
        dht_prefix=getattr(args, "dht_prefix", None),
        use_relay=not args.no_relay,
        auto_nat=not args.no_auto_nat,
        request_timeout=args.request_timeout,
        local_edge_blocks=getattr(args, "local_blocks", 0),
    )


def add_client_args(parser: argparse.ArgumentParser, peers_required: bool = True) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        required=peers_required,
        metavar="MADDR",
        type=peer_maddr,
        help="any peers of the swarm (multiaddrs ending in /p2p/PEER_ID)",
    )
    parser.add_argument("--no-relay", action="store_true", help="neither use nor offer libp2p relays")
    parser.add_argument(
        "--no-auto-nat", action="store_true", help="do not ask peers whether this computer is reachable"
    )
    parser.add_argument(
        "--request-timeout", type=positive_float, default=30.0, help="seconds to wait for a server's answer"
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
    check_model_argument(args.model)
    progress(f"joining the swarm through {' '.join(args.initial_peers)} ...")  # before the slow imports
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
        progress(f"privacy: {privacy}: no other server receives this chat's hidden states")
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
            if isinstance(exc, Terminated):
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
        progress(f"looking for servers of {model.dht_prefix} ...")
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
                if isinstance(exc, Terminated):
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
            progress(f"{exc}; looking again in {delay:.0f} s ({attempt + 1}/{attempts - 1})")
            time.sleep(delay)
    raise AssertionError("unreachable")
