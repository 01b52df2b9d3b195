"""Spot checks against real servers on 127.0.0.1: liars (a test-only handler subclass) are caught and
banned, generation returns what honest servers give, honest servers of every precision are never
flagged, and a span nobody else serves stays unverified."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import corolla
from corolla.swarm.client.verification import ledger_of, promised_steps
from corolla.testing.swarm import REPO, CorollaServer, route_first_through

PREFIX = "tiny-verify"
LIAR = [sys.executable, str(REPO / "tests" / "support" / "liar_server.py")]
LIES = {"noise": "noise:0.1", "zeros": "zeros", "previous": "previous", "late": "after:20:zeros"}
HONEST = {"f32a": ("float32", "none"), "f32b": ("float32", "none"), "bf16": ("bfloat16", "none")}
QUANTIZED = {"fp16": ("float16", "none"), "int8": ("float32", "int8"), "nf4": ("float32", "nf4")}
CLIENT = {"use_relay": False, "auto_nat": False, "request_timeout": 20.0, "max_retries": 3, "min_backoff": 0.2}


def _serve(tmp, model, name, dtype, quant, join, launcher=()):
    return CorollaServer(
        tmp,
        model,
        *join,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        "0:6",
        "--torch-dtype",
        dtype,
        "--quant-type",
        quant,
        "--throughput",
        "10",
        "--step-timeout",
        "60",
        name=name,
        launcher=launcher,
    )


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    """Six honest servers of every precision and four liars, all serving the whole tiny model."""
    tmp = tmp_path_factory.mktemp("verify-swarm")
    servers: dict[str, CorollaServer] = {}
    try:
        servers["f32a"] = _serve(tmp, model_dir, "f32a", "float32", "none", ["--new-swarm"])
        join = ["--initial-peers", servers["f32a"].maddr]
        for name, (dtype, quant) in {**HONEST, **QUANTIZED}.items():
            if name != "f32a":
                servers[name] = _serve(tmp, model_dir, name, dtype, quant, join)
        for name, lie in LIES.items():
            servers[name] = _serve(tmp, model_dir, name, "float32", "none", join, [*LIAR, lie, "--"])
        for server in servers.values():
            server.wait_state("online", timeout=300)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _client(model_dir, swarm, usable: list[str], rate: float):
    blocked = [server.peer_id for name, server in swarm.items() if name not in usable]
    return corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir,
        initial_peers=[swarm["f32a"].maddr],
        dht_prefix=PREFIX,
        blocked_servers=blocked,
        spot_check_rate=rate,
        **CLIENT,
    )


def _prompt(seed: int, length: int = 5) -> torch.Tensor:
    return torch.randint(6, 500, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def honest_tokens(model_dir, swarm):
    model = _client(model_dir, swarm, ["f32a", "f32b"], rate=0.0)
    try:
        yield {seed: model.generate(_prompt(seed), max_new_tokens=30, do_sample=False) for seed in range(2)}
    finally:
        model.close()


@pytest.mark.parametrize("lie", list(LIES))
def test_a_liar_is_flagged_and_the_output_is_the_honest_one(model_dir, swarm, honest_tokens, lie):
    rate = 0.5
    liar = swarm[lie].peer_id
    model = _client(model_dir, swarm, ["f32a", "f32b", lie], rate=rate)
    try:
        ledger = ledger_of(model.view)
        route_first_through(model, liar)
        assert liar[-6:] in model.route()
        for seed in range(2):
            tokens = model.generate(_prompt(seed), max_new_tokens=30, do_sample=False)
            assert torch.equal(tokens, honest_tokens[seed]), f"seed {seed}: the liar's tokens reached the output"
        evidence = ledger.flagged.get(liar)
        assert evidence is not None, f"the {lie} liar was not flagged"
        assert evidence["blocks"] == [0, 6] and evidence["error"] > evidence["tolerance"]
        assert set(evidence["disagreed_with"]) == {swarm["f32a"].peer_id, swarm["f32b"].peer_id}
        # Caught within the steps the rate promises after it started lying (the late liar lies from its
        # 21st step on; the others from their first, but a server's first steps are all checked).
        lied_from = 21 if lie == "late" else 1
        assert evidence["step"] is not None
        assert evidence["step"] - lied_from + 1 <= promised_steps(rate) + ledger.first_steps
        assert liar in model.view.config.blocked_servers and liar[-6:] not in model.route()
        assert not set(ledger.flagged) - {liar}, "an honest server was flagged"
    finally:
        model.close()


def test_checks_follow_speculative_rollbacks_and_beams_without_flagging_honest_servers(model_dir, swarm, honest_tokens):
    """Every step checked while drafts are rolled back and beams reorder the rows: the outputs a check
    compares stay aligned with the inputs (verification keeps them in a buffer that grows in place)."""
    model = _client(model_dir, swarm, ["f32a", "f32b"], rate=1.0)
    try:
        ledger = ledger_of(model.view)
        for seed in range(2):
            drafted = model.generate(_prompt(seed), max_new_tokens=30, do_sample=False, prompt_lookup_num_tokens=4)
            assert torch.equal(drafted, honest_tokens[seed])
        repeating = torch.tensor([[7, 8, 9, 10, 7, 8, 9, 10, 7, 8, 9]])  # drafts, some rejected: rollbacks
        model.generate(repeating, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=4)
        assert model.speculation is not None and model.speculation.stats.drafted > 0
        model.generate(_prompt(5), max_new_tokens=12, do_sample=False, num_beams=3)
        assert not ledger.flagged, f"honest servers were flagged: {ledger.flagged}"
        assert ledger.disputes == 0 and sum(ledger.checks.values()) > 0
    finally:
        model.close()


def test_a_span_nobody_else_serves_is_never_flagged_and_stays_unverified(model_dir, swarm):
    only = swarm["f32a"].peer_id
    model = _client(model_dir, swarm, ["f32a"], rate=1.0)
    try:
        ledger = ledger_of(model.view)
        tokens = model.generate(_prompt(0), max_new_tokens=8, do_sample=False)
        assert tokens.shape == (1, 13)
        assert ledger.steps[only] >= 8  # every step was a candidate for a check ...
        assert not ledger.flagged and not ledger.checks  # ... but there was nobody to compare with
        assert ledger.state(only) == "unverified"
    finally:
        model.close()


@pytest.mark.slow
def test_honest_servers_of_every_precision_are_never_flagged_in_200_sessions(model_dir, swarm):
    names = [*HONEST, *QUANTIZED]
    model = _client(model_dir, swarm, names, rate=1.0)  # every step checked: the strictest setting
    try:
        ledger = ledger_of(model.view)
        for session in range(200):
            if session % 10 == 0:  # each precision takes its turn as the first choice (and as checker)
                route_first_through(model, swarm[names[(session // 10) % len(names)]].peer_id)
            model.generate(_prompt(session, length=4), max_new_tokens=3, do_sample=False)
        assert not ledger.flagged, f"honest servers were flagged: {ledger.flagged}"
        assert ledger.disputes == 0
        for name in names:
            assert ledger.checks[swarm[name].peer_id] > 0, f"{name} was never compared with another server"
        assert sum(ledger.checks.values()) >= 2 * 200
    finally:
        model.close()


@pytest.fixture(scope="module")
def node(model_dir, swarm, tmp_path_factory):
    from corolla.testing.node import NodeProcess

    node = NodeProcess(tmp_path_factory.mktemp("verify-node"))
    try:
        settings = node.get("/api/settings").json()
        settings.update(
            swarm="custom",
            custom_peers=[swarm["f32a"].maddr],
            model=str(model_dir),
            dht_prefix=PREFIX,
            contribute=False,
        )
        assert node.client.put("/api/settings", json=settings).status_code == 200
        yield node
    finally:
        node.stop()


def test_the_node_checks_a_server_on_purpose_and_remembers_a_liar(node, swarm):
    liar, honest = swarm["noise"].peer_id, swarm["f32b"].peer_id
    result = node.post("/api/swarm/check", json={"peer_id": liar}).json()
    assert result["state"] == "flagged" and result["compared_with"] == ["this computer"]
    assert result["max_error"] > 0.05 and "differ" in result["detail"]
    result = node.post("/api/swarm/check", json={"peer_id": honest}).json()
    assert result["state"] == "verified" and result["max_error"] < 0.01, result
    missing = node.post("/api/swarm/check", json={"peer_id": "12D3KooWNobodyServesThis"})
    assert missing.status_code == 404 and missing.json()["kind"] == "not_found"
    assert node.client.post("/api/swarm/check", json={}).status_code == 422
    unauthorized = node.client.post("/api/swarm/check", json={"peer_id": liar}, headers={"Authorization": "x"})
    assert unauthorized.status_code == 401

    servers = {s["peer_id"]: s for m in node.get("/api/swarm").json() for s in m["servers"]}
    flagged = servers[liar]["verification"]
    assert flagged["state"] == "flagged" and flagged["evidence"]["disagreed_with"] == ["this computer"]
    assert flagged["evidence"]["blocks"] == [0, 6]
    assert servers[honest]["verification"] == {"state": "verified", "checks": 1, "evidence": None}
    assert servers[swarm["f32a"].peer_id]["verification"]["state"] == "unverified"  # never checked yet
    # Beside the verdicts, each server's speed as this node measured it (the check timed the honest one).
    assert servers[honest]["speed"]["state"] == "measured" and servers[honest]["speed"]["steps"] >= 1
    assert servers[swarm["f32a"].peer_id]["speed"] == {
        "state": "unmeasured",
        "steps": 0,
        "step_s": None,
        "stalls": 0,
        "evidence": None,
    }

    # The flag is in the node's database, and `corolla swarm check` asks the running node.
    databases = list(node.home.rglob("*.db")) + list(node.home.rglob("*.sqlite*"))
    rows = [r for db in databases for r in _flagged_rows(db)]
    assert [r[0] for r in rows] == [liar]
    env = {**os.environ, "COROLLA_HOME": str(node.home)}
    cli = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "swarm", "check", liar],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 3 and cli.stdout.startswith("flagged:"), cli.stdout + cli.stderr


def _flagged_rows(path):
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return db.execute("SELECT peer_id, evidence FROM flagged_servers").fetchall()
    except sqlite3.DatabaseError:
        return []


def test_a_chat_reply_through_a_liar_is_the_honest_reply(model_dir, swarm):
    from corolla.swarm.client.chat import ChatSession

    replies = {}
    for name, usable in {"honest": ["f32a", "f32b"], "liar": ["f32a", "f32b", "zeros"]}.items():
        model = _client(model_dir, swarm, usable, rate=0.5)
        try:
            if name == "liar":
                route_first_through(model, swarm["zeros"].peer_id)
            pieces: list[str] = []
            reply = ChatSession(model).send("hello there", max_new_tokens=20, on_text=pieces.append, do_sample=False)
            replies[name] = (reply.text, reply.tokens, "".join(pieces))
            if name == "liar":
                assert swarm["zeros"].peer_id in ledger_of(model.view).flagged
        finally:
            model.close()
    assert replies["liar"][:2] == replies["honest"][:2]  # the stored reply and its tokens are the honest ones
    assert replies["liar"][2].endswith(replies["honest"][0][-5:])  # the stream ends with the honest text


def test_a_rewound_reply_hands_out_agreeing_text_once(tiny_models):
    from transformers import AutoTokenizer

    from corolla.swarm.client.chat import ReplyWatcher

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.get("llama")))
    pieces: list[str] = []
    watcher = ReplyWatcher(tokenizer, [], on_text=pieces.append)
    for token in (300, 301, 302):
        watcher(torch.tensor([token]))
    shown = "".join(pieces)
    watcher.rewind()
    for token in (300, 301, 302, 303):  # the re-run agrees, then goes on
        watcher(torch.tensor([token]))
    assert "".join(pieces) == tokenizer.decode([300, 301, 302, 303], skip_special_tokens=True)
    assert "".join(pieces).startswith(shown) and watcher.stream.tokens == [300, 301, 302, 303]


def test_tolerances_relative_errors_and_promises():
    from corolla.swarm.client.health import ModelHealth, ServerHealth, format_health
    from corolla.swarm.client.verification import precision_tolerance, relative_error

    assert precision_tolerance("float32", "none") < precision_tolerance("float16", None)
    assert precision_tolerance("torch.bfloat16", "none") < precision_tolerance("float32", "int8")
    assert precision_tolerance("float32", "int8") < precision_tolerance("bfloat16", "nf4") < 1.0  # zeros are caught
    assert precision_tolerance(None, None) == precision_tolerance("float64", "gptq")  # unknown: the loosest
    out = torch.randn(2, 5, 64)
    assert relative_error(out, out) == 0.0
    assert relative_error(torch.zeros_like(out), out) == pytest.approx(1.0)
    assert relative_error(out * float("nan"), out) == float("inf")
    assert relative_error(out[:, :4], out) == float("inf")  # a wrong shape never passes
    assert 0.05 < relative_error(out + 0.1 * torch.randn_like(out), out) < 0.5
    assert promised_steps(1.0) == 1 and promised_steps(0.5) == 10 and promised_steps(0.1) == 66

    server = ServerHealth("12D3KooWLiarLiar", "online", 0, 6, 10.0, None, None, "0.1", False, None, None, None, None)
    model = ModelHealth("tiny", 6, None, [server], [1] * 6)
    text = format_health([model], {server.peer_id: {"dht_prefix": "tiny", "detail": "its outputs differ"}})
    assert "FLAGGED" in text and "its outputs differ" in text
    assert "FLAGGED" not in format_health([model])


def test_two_loose_precisions_never_wave_zeros_through():
    # nf4 + nf4 allowances sum past 1, the relative error of zeros: the pair's tolerance is capped below it.
    from types import SimpleNamespace

    from corolla.swarm.client.verification import Ledger, pair_tolerance, relative_error
    from corolla.swarm.protocol import ServerInfo, ServerState

    ledger = Ledger()
    for peer, quant in [("liar", "nf4"), ("checker", "nf4"), ("exact", "none")]:
        ledger.infos[peer] = ServerInfo(ServerState.ONLINE, 1.0, 0, 6, torch_dtype="float32", quant_type=quant)
    view = SimpleNamespace(spans={}, verification=ledger)  # pair_tolerance reads only these
    out = torch.randn(1, 5, 64)
    zeros_error = relative_error(torch.zeros_like(out), out)
    assert pair_tolerance(view, ["liar"], ["checker"]) < zeros_error
    assert pair_tolerance(view, ["liar"], ["exact"]) < zeros_error
    assert pair_tolerance(view, ["exact"], ["exact"]) < 0.05  # exact pairs stay tight


def test_swarm_check_usage_errors(tmp_path):
    env = {**os.environ, "COROLLA_HOME": str(tmp_path)}

    def corolla_cli(*args):
        command = [sys.executable, "-m", "corolla.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    result = corolla_cli("swarm", "check")
    assert result.returncode == 2 and "corolla swarm check PEER_ID" in result.stderr
    result = corolla_cli("swarm")
    assert result.returncode == 2 and "--initial-peers" in result.stderr
    result = corolla_cli("swarm", "check", "12D3KooWSomeone")
    assert result.returncode == 1 and "no Corolla node is running" in result.stderr
