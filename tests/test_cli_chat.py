"""`corolla chat` as a person uses it: in a terminal (a pty), Ctrl-C mid-reply, failures that say why."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pexpect
import pytest
import torch

from corolla.testing.swarm import CorollaServer
from tests.support.procs import descendants, describe, kill_all, wait_gone

PREFIX = "tiny-clichat"
LOOPBACK = ["--no-relay", "--no-auto-nat"]


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    model = tiny_models.get("llama")
    server = CorollaServer(
        tmp_path_factory.mktemp("clichat"),
        model,
        "--new-swarm",
        "--dht-prefix",
        PREFIX,
        "--blocks",
        "0:6",
        "--torch-dtype",
        "float32",
        "--throughput",
        "10",
        "--inference-max-length",
        "8192",
    )
    try:
        yield model, server.maddr
    finally:
        server.stop()


def _chat_command(model, maddr: str, *args: str) -> list[str]:
    return ["-m", "corolla.cli", "chat", str(model), "--initial-peers", maddr, "--dht-prefix", PREFIX, *LOOPBACK, *args]


def _spawn_chat(args: list[str], **options) -> pexpect.spawn:
    """The chat on a terminal, with Ctrl-C as a terminal gives it: a suite started in the background
    (`cmd &` in a script) ignores SIGINT, and a program inherits that, so Ctrl-C would do nothing."""
    return pexpect.spawn(sys.executable, args, timeout=120, encoding="utf-8", preexec_fn=_default_sigint, **options)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_reply_returns_to_the_prompt_and_the_next_message_works(served):
    model, maddr = served
    # Replies long enough to be interrupted: random weights rarely say end-of-sequence.
    args = _chat_command(model, maddr, "--max-new-tokens", "4000", "--max-length", "8192")
    child = _spawn_chat(args, env={**os.environ, "TERM": "dumb"})
    try:
        child.expect_exact("> ")
        for turn in range(2):
            child.sendline(f"tell me a long story {turn}")
            child.expect_exact(f"story {turn}\r\n")  # the terminal's echo of the line
            child.expect(r"\S")  # the reply streams (a Ctrl-C before the line is read quits, as at the prompt)
            child.sendintr()  # Ctrl-C, as the terminal sends it: to the whole foreground group
            child.expect(r"-- (\d+) tokens, .* stopped by Ctrl-C", timeout=30)
            assert int(child.match.group(1)) < 4000
            child.expect_exact("> ", timeout=30)
        child.sendline("")  # an empty line quits
        child.expect(pexpect.EOF, timeout=60)
        transcript = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, transcript
    assert "Traceback" not in transcript and "Task exception" not in transcript, transcript


def test_ctrl_c_at_the_prompt_quits_cleanly(served):
    model, maddr = served
    child = _spawn_chat(_chat_command(model, maddr))
    try:
        child.expect_exact("> ")
        child.sendintr()
        child.expect(pexpect.EOF, timeout=60)
        transcript = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and "Traceback" not in transcript, transcript


def _run(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    return result, time.monotonic() - started


def test_the_servers_refusal_reaches_the_user(served):
    model, maddr = served
    result, _ = _run(*_chat_command(model, maddr, "--prompt", "hi", "--max-length", "99999"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("corolla: error:") and re.search(r"99999", last) and "8192" in last, result.stderr


def test_trusted_only_chats_through_the_named_servers_and_refuses_what_they_cannot_cover(served):
    model, maddr = served
    result, _ = _run(*_chat_command(model, maddr, "--prompt", "hi", "--max-new-tokens", "3", "--trusted-only"))
    assert result.returncode == 0, result.stderr
    assert "privacy: members of my swarms (1 peer)" in result.stderr
    stranger = "QmedTaZXmULqwspJXz44SsPZyTNKxhnnFvYRajfH7MGhCY"  # serves nothing here
    result, _ = _run(*_chat_command(model, maddr, "--prompt", "hi", "--trusted-peers", stranger))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("corolla: error: privacy") and "block(s) 0, 1, 2, 3, 4, 5" in last, result.stderr
    assert "looking again" not in result.stderr  # at once: waiting would not change who is trusted
    for bad, says in [("not-a-peer", "is not a peer id"), (None, "is empty")]:
        result, _ = _run(*_chat_command(model, maddr, "--prompt", "hi", "--trusted-peers", *([bad] if bad else [])))
        assert result.returncode == 2 and says in result.stderr.strip().splitlines()[-1], result.stderr


def test_local_blocks_answer_the_same_and_too_many_is_a_usage_error(served):
    """--local-blocks K runs the first and last K blocks here: the same greedy reply as without; a K the
    model cannot spare (6 blocks: at most 2 at each end) is the user's to fix, in one line."""
    model, maddr = served
    plain, _ = _run(*_chat_command(model, maddr, "--prompt", "hi there", "--max-new-tokens", "6"))
    edged, _ = _run(
        *_chat_command(model, maddr, "--prompt", "hi there", "--max-new-tokens", "6", "--local-blocks", "2")
    )
    assert plain.returncode == 0 and edged.returncode == 0, (plain.stderr, edged.stderr)
    assert edged.stdout == plain.stdout and edged.stdout.strip()
    result, _ = _run(*_chat_command(model, maddr, "--prompt", "hi", "--local-blocks", "3"))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("corolla: error:") and "at most 2 at each end" in last, result.stderr


def test_a_model_nobody_serves_is_reported_with_progress(served):
    model, maddr = served
    args = ["-m", "corolla.cli", "chat", str(model), "--initial-peers", maddr, "--dht-prefix", "nobody-serves-this"]
    result, _ = _run(*args, *LOOPBACK, "--prompt", "hi")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert any("looking for servers" in line for line in lines[:-1]), result.stderr
    assert lines[-1].startswith("corolla: error:") and "nobody-serves-this" in lines[-1], result.stderr


def test_a_reply_cut_inside_a_character_reads_the_same_streamed_and_not(tiny_models):
    """What the node's /v1/chat/completions returns: streamed pieces, or the watcher's text at the end."""
    from transformers import AutoTokenizer

    from corolla.swarm.client.chat import ReplyWatcher

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.get("llama")))
    ids = tokenizer("ok 日本 🌸", add_special_tokens=False).input_ids
    pieces: list[str] = []
    watcher = ReplyWatcher(tokenizer, [], on_text=pieces.append)
    cut = len(ids) - 1  # the flower takes several byte tokens: the reply ends inside it
    assert tokenizer.decode(ids[:cut]).endswith("\ufffd")
    for token in ids[:cut]:
        watcher(torch.tensor([token]))
    assert "".join(pieces) == watcher.text() == "ok 日本 "


def test_swarm_text_and_json_agree_and_say_nothing_else(served):
    import json

    _, maddr = served
    base = ["-m", "corolla.cli", "swarm", "--initial-peers", maddr, *LOOPBACK]
    as_json, _ = _run(*base, "--json")
    as_text, _ = _run(*base)
    for result in (as_json, as_text):
        assert result.returncode == 0, result.stderr
        assert "Task was destroyed" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    (model,) = [m for m in json.loads(as_json.stdout) if m["dht_prefix"] == PREFIX]
    (server,) = model["servers"]
    assert server["free_cache_tokens"] == server["cache_tokens_left"] // (2 * 6) > 0
    assert f"free cache {server['free_cache_tokens']} tok" in as_text.stdout, as_text.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_chat_group_at_the_prompt_leaves_nothing(served, sig):
    model, maddr = served
    child = _spawn_chat(_chat_command(model, maddr))
    tree = []
    try:
        child.expect_exact("> ")
        tree = descendants(child.pid)
        assert any("p2pd" in " ".join(p.cmdline()) for p in tree), describe(tree)
        os.killpg(child.pid, sig)
        child.expect(pexpect.EOF, timeout=30)
        transcript = child.before
        left = wait_gone(tree, 15)
        assert not left, describe(left)
    finally:
        kill_all(tree)
        child.close(force=True)
    assert "Traceback" not in transcript, transcript
    assert child.exitstatus == (143 if sig == signal.SIGTERM else 0), transcript
