"""`corolla node|status|stop|uninstall|demo|app` and `--self-test`: the daemon, and talking to it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from corolla.api import routes
from corolla.api.client import NodeError
from corolla.cli.common import node_call, running_node_client
from corolla.executable import corolla_command
from corolla.units import human_bytes


def cmd_node(args: argparse.Namespace) -> int:
    if not sys.stderr.isatty():
        # A log file (the window's node, `corolla demo`, a service): progress bars there are thousands of
        # carriage-return frames; the status says what the node is doing instead. Set before anything
        # imports tqdm (it reads TQDM_* when imported); inherited by the block server the node starts.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    from corolla.memory import cap_malloc_arenas, import_hivemind_lightly, start_trimming

    cap_malloc_arenas()
    import_hivemind_lightly()  # before anything imports hivemind: memory.py says why
    start_trimming()
    from corolla.node.service import run_node

    return run_node(port=args.port)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        status = node_call("GET", routes.STATUS)
    except NodeError as exc:
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
        print(node_call("POST", routes.SHUTDOWN)["message"])
    except NodeError as exc:
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
                status = node_call("GET", routes.STATUS)
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
            except NodeError:
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
        body = {
            "model": status["model"],
            "messages": [{"role": "user", "content": args.prompt}],
            "max_tokens": args.max_new_tokens,
            "temperature": 0,
            "stream": True,
        }
        print(f"> {args.prompt}")
        tokens, began, reply = 0, time.perf_counter(), []
        for _, chunk in running_node_client(paths).stream("/v1/chat/completions", body, timeout=120):
            if not isinstance(chunk, dict):  # the closing "[DONE]"
                continue
            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
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
        for model in node_call("GET", routes.SWARM):
            for server in model["servers"]:
                mine = " (this computer)" if server.get("this_computer") else ""
                print(
                    f"swarm: {model['dht_prefix']} blocks {server['start_block']}:{server['end_block']} "
                    f"{server['state']} {server['throughput']:.0f} tok/s ping {server['ping_ms']} ms{mine}"
                )
        time.sleep(1.5)  # the block server publishes its counters every second
        served = node_call("GET", routes.STATUS)["contribution"]["tokens_served"]
        print(f"stats: this computer has served {served} tokens since its block server started")
        return 0
    except NodeError as exc:
        print(f"corolla: {exc}", file=sys.stderr)
        return 1
    finally:
        if started is not None and not args.keep:
            with contextlib.suppress(NodeError):
                node_call("POST", routes.SHUTDOWN)
            started.wait(60)


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from corolla.gui.app import main as app_main
    except ImportError as exc:
        print(f"corolla: the window needs PySide6 (pip install 'corolla[gui]'): {exc}", file=sys.stderr)
        return 2
    return app_main([sys.argv[0]])
