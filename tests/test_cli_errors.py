"""Mistakes a new user makes on the command line: each gets one or two lines saying what is wrong and
what to do, exit code 2 for usage errors and 1 for runtime failures, and never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

DEAD_PEER = "/ip4/127.0.0.1/tcp/9/p2p/QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"
LOOPBACK = ["--no-relay", "--no-auto-nat"]


def corolla(*args: str, env: dict | None = None, module: str = "corolla.cli") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def assert_short_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    # Besides progress lines ("corolla: ..." and serve's timestamped log), only the error and a hint.
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("corolla: ") and not re.match(r"\d{4}-\d\d-\d\d \d\d:", line)
    ]
    errors = [line for line in result.stderr.splitlines() if line.startswith("corolla: error:")]
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and len(lines) <= 1, result.stderr  # the error, and at most a hint
    for needle in needles:
        assert needle in errors[0], result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--num-blocks", "0", "--new-swarm"], ["--num-blocks", "at least 1"]),
        (["--num-blocks", "-1", "--new-swarm"], ["at least 1"]),
        (["--blocks", "5:2", "--new-swarm"], ["empty or reversed"]),
        (["--blocks", "3:3", "--new-swarm"], ["empty or reversed"]),
        (["--initial-peers", "garbage"], ["not a multiaddr"]),
        (["--initial-peers", "/ip4/127.0.0.1/tcp/9"], ["no /p2p/PEER_ID"]),
        (["--initial-peers", "/ip4/999.1.1.1/tcp/9/p2p/QmXfptdHU6hqG95JswxYVUH4bphcK8y18mhFcgUQFe6fCN"], ["IPv4"]),
        ([], ["--initial-peers", "--new-swarm"]),
        (["--new-swarm", "--initial-peers", DEAD_PEER], ["--new-swarm"]),
        (["--new-swarm", "--port", "70000"], ["port"]),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_serve_usage_errors(tmp_path, args, needles):
    assert_short_error(corolla("serve", str(tmp_path), *args), 2, *needles)


def test_chat_and_swarm_check_their_peers_too(tmp_path):
    assert_short_error(corolla("chat", str(tmp_path), "--initial-peers", "garbage"), 2, "not a multiaddr")
    assert_short_error(corolla("swarm", "--initial-peers", "/ip4/127.0.0.1/tcp/9"), 2, "/p2p/")


def test_a_file_is_not_a_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_short_error(corolla("model", "info", str(text)), 2, "is a file")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert_short_error(corolla("serve", str(gguf), "--new-swarm"), 2, "corolla model import")


def test_a_missing_device_is_an_error_not_a_silent_cpu(tiny_models):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this computer has CUDA")
    model = str(tiny_models.get("llama"))
    result = corolla("chat", model, "--dht-prefix", "x", "--device", "cuda", "--initial-peers", DEAD_PEER)
    assert_short_error(result, 2, "CUDA")


@pytest.mark.slow
def test_an_unreachable_peer_is_one_line_in_every_command(tiny_models):
    model = str(tiny_models.get("llama"))
    for args in (
        ["swarm", "--initial-peers", DEAD_PEER, *LOOPBACK],
        ["chat", model, "--dht-prefix", "x", "--initial-peers", DEAD_PEER, *LOOPBACK, "--prompt", "hi"],
        [
            "serve",
            model,
            "--dht-prefix",
            "x",
            "--initial-peers",
            DEAD_PEER,
            *LOOPBACK,
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
        ],
    ):
        assert_short_error(corolla(*args), 1, "could not join the swarm", "none of them answered")


def test_debug_shows_the_traceback(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = corolla("model", "info", str(text), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_status_json_without_a_node_is_json(tmp_path):
    result = corolla("status", "--json", env={"COROLLA_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"running": False, "error": result.stderr.strip().removeprefix("corolla: ")}


def test_python_dash_m_corolla_works():
    import corolla as package

    result = corolla("--version", module="corolla")
    assert result.returncode == 0 and result.stdout.strip() == f"corolla {package.__version__}"


def test_every_serve_flag_has_a_line_of_help():
    from corolla.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name in ("serve", "chat", "swarm"):
        flags = [a for a in commands.choices[name]._actions if a.option_strings and a.dest != "help"]
        assert flags, name
        assert [a.option_strings[0] for a in flags if not a.help] == [], name
    result = corolla("serve", "--help")
    assert result.returncode == 0
    for flag in ("--initial-peers", "--dht-prefix", "--blocks", "--num-blocks", "--quant-type", "--no-relay"):
        assert flag in result.stdout
