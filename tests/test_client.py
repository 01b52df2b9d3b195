"""The swarm client against real Corolla servers on 127.0.0.1: routing, generation, failover."""

from __future__ import annotations

import time

import pytest
import torch

import corolla
from corolla.swarm.client import speculative
from corolla.swarm.client.routing import MissingBlocksError
from corolla.testing.swarm import TINY_SWARM_PREFIX, CorollaServer, StatsGrowth, generate_pushing_every_hop

PREFIX = TINY_SWARM_PREFIX
LOCAL = {"initial_peers": None}
CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 10.0, "max_retries": 4, "min_backoff": 0.2}


def serve(tmp, model, blocks, *extra, name):
    return CorollaServer(
        tmp,
        model,
        "--dht-prefix",
        PREFIX,
        "--blocks",
        blocks,
        "--torch-dtype",
        "float32",
        "--throughput",
        "10",
        "--step-timeout",
        "30",
        *extra,
        name=name,
    )


@pytest.fixture(scope="module")
def swarm(tiny_swarm):
    return tiny_swarm


@pytest.fixture(scope="module")
def remote(model_dir, swarm):
    model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers=[swarm[0].maddr], dht_prefix=PREFIX, **CLIENT_OPTIONS
    )
    yield model
    model.close()


def prompt(batch=1, length=6, seed=0):
    return torch.randint(6, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_route_covers_the_model_through_three_servers(remote, swarm):
    route = remote.route()
    assert route.startswith("0:2 via") and "2:4 via" in route and "4:6 via" in route
    assert swarm[0].peer_id[-6:] in route


def test_waiting_for_a_route_returns_it_or_says_why_there_is_none(model_dir, remote, swarm):
    assert remote.wait_for_route(30) == remote.route()
    with (
        corolla.AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=[swarm[0].maddr], dht_prefix="nobody-serves-this", **CLIENT_OPTIONS
        ) as lonely,
        pytest.raises(MissingBlocksError),
    ):  # after its timeout, the reason there is no route
        lonely.wait_for_route(2, interval=0.5)


def test_greedy_generation_equals_local(remote, local):
    for batch in (1, 2):
        ids = prompt(batch)
        want = local.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            eos_token_id=None,
            pad_token_id=3,
        )
        got = remote.generate(ids, max_new_tokens=12, eos_token_id=[])
        assert torch.equal(got, want)


def test_seeded_sampling_equals_local(remote, local):
    ids = prompt(seed=4)
    options = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=10)
    torch.manual_seed(1234)
    want = local.generate(
        ids, attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=3, repetition_penalty=1.1, **options
    )
    got = remote.generate(ids, seed=1234, eos_token_id=[], repetition_penalty=1.1, **options)
    assert torch.equal(got, want)
    again = remote.generate(ids, seed=1234, eos_token_id=[], repetition_penalty=1.1, **options)
    assert torch.equal(again, got)


def test_multi_turn_session_reuse(remote, local):
    first, second = prompt(length=4, seed=5), prompt(length=3, seed=6)
    with remote.inference_session(max_length=40) as session:
        turn1 = remote.generate(first, max_new_tokens=5, eos_token_id=[], session=session)
        turn2 = remote.generate(second, max_new_tokens=5, eos_token_id=[], session=session)
        assert session.position == 4 + 5 + 3 + 4  # the last token of each turn is pending until the next
    whole = torch.cat([turn1, second], dim=1)
    want = local.generate(
        whole,
        max_new_tokens=5,
        do_sample=False,
        attention_mask=torch.ones_like(whole),
        eos_token_id=None,
        pad_token_id=3,
    )
    assert torch.equal(turn2[:, -5:], want[:, -5:])


def test_forward_logits_equal_local(remote, local):
    ids = prompt(length=9, seed=2)
    assert torch.allclose(remote(ids).logits, local(ids).logits, atol=1e-4)


def test_bad_sampling_settings_are_refused(remote):
    with pytest.raises(ValueError, match="temperature"):
        remote.generate(prompt(), temperature=0.0, do_sample=True)
    with pytest.raises(ValueError, match="top_p"):
        remote.generate(prompt(), top_p=1.5)


@pytest.mark.slow
def test_missing_blocks_is_a_clear_error_not_a_hang(model_dir, tmp_path):
    lone = serve(tmp_path, model_dir, "0:4", "--new-swarm", "--dht-prefix", "tiny-partial", name="partial")
    try:
        model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=[lone.maddr], dht_prefix="tiny-partial", **{**CLIENT_OPTIONS, "max_retries": 2}
        )
        try:
            started = time.monotonic()
            with pytest.raises(MissingBlocksError, match=r"block\(s\) 4, 5 of tiny-partial"):
                model.generate(prompt(), max_new_tokens=2)
            assert time.monotonic() - started < 30
        finally:
            model.close()
    finally:
        lone.stop()


@pytest.mark.slow
@pytest.mark.parametrize("replacement", ["same-boundaries", "split-boundaries"])
def test_server_killed_mid_generation_is_replaced_exactly(model_dir, local, tmp_path, replacement):
    prefix = f"tiny-failover-{replacement}"
    common = ["--dht-prefix", prefix]
    head = serve(tmp_path, model_dir, "0:3", "--new-swarm", *common, name="head")
    others = []
    try:
        victim = serve(tmp_path, model_dir, "3:6", "--initial-peers", head.maddr, *common, name="victim")
        others.append(victim)
        victim.wait_state("online")
        model = corolla.AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=[head.maddr], dht_prefix=prefix, **CLIENT_OPTIONS
        )
        try:
            ids = prompt(seed=9)
            want = local.generate(
                ids,
                max_new_tokens=16,
                do_sample=False,
                attention_mask=torch.ones_like(ids),
                eos_token_id=None,
                pad_token_id=3,
            )
            # Standbys join only now, so the first route surely goes through the victim.
            blocks = ["3:6"] if replacement == "same-boundaries" else ["3:5", "5:6"]
            with model.inference_session(max_length=40) as session:
                standbys = [
                    serve(tmp_path, model_dir, b, "--initial-peers", head.maddr, *common, name=f"s{i}")
                    for i, b in enumerate(blocks)
                ]
                others += standbys
                first_route = None

                def on_token(tokens):
                    nonlocal first_route
                    if first_route is None:
                        first_route = session.route
                        for standby in standbys:
                            standby.wait_state("online")
                        victim.kill()  # SIGKILL, mid-generation

                got = model.generate(ids, max_new_tokens=16, eos_token_id=[], session=session, streamer=on_token)
                assert victim.peer_id[-6:] in first_route
                assert session.replacements >= 1 and victim.peer_id[-6:] not in session.route
            assert torch.equal(got, want)
        finally:
            model.close()
    finally:
        for peer in others:
            peer.kill()
        head.stop()


def test_chat_reuses_one_session_across_turns(remote, local):
    from corolla.swarm.client.chat import ChatSession

    chat = ChatSession(remote, system_prompt="be brief", max_length=256)
    try:
        pieces: list[str] = []
        first = chat.send("hello there", max_new_tokens=6, on_text=pieces.append)
        assert "".join(pieces) == first.text and first.tokens >= 1
        session = chat._session
        position = session.position
        second = chat.send("and again", max_new_tokens=6)
        assert chat._session is session and session.position > position  # no re-prefill
        # The second reply equals a fresh local generation over the whole rendered conversation.
        tokenizer = remote.tokenizer
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": "be brief"}, *chat.messages[:-1]], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer(rendered, add_special_tokens=False).input_ids])
        want = local.generate(
            ids,
            max_new_tokens=second.tokens,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            eos_token_id=None,
            pad_token_id=3,
        )
        assert tokenizer.decode(want[0, ids.shape[1] :], skip_special_tokens=True) == second.text
    finally:
        chat.close()


def test_chat_stop_sequence_truncates_the_reply(remote):
    from corolla.swarm.client.chat import ChatSession

    free = ChatSession(remote, max_length=128)
    full = free.send("tell me", max_new_tokens=8)
    free.close()
    stop = full.text.strip()[2:4]
    if not stop:
        pytest.skip("the random model answered too briefly to place a stop sequence")
    chat = ChatSession(remote, max_length=128)
    reply = chat.send("tell me", max_new_tokens=8, stop=[stop])
    chat.close()
    assert reply.stopped_by == "stop string" and stop not in reply.text
    assert full.text.startswith(reply.text)


def test_text_stream_never_splits_a_character(remote):
    from corolla.swarm.client.chat import TextStream

    tokenizer = remote.tokenizer
    ids = tokenizer("日本語 🌸 ok", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "".join(pieces) == "日本語 🌸 ok"
    assert all("\ufffd" not in piece for piece in pieces)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "corolla.cli", *args], capture_output=True, text=True, timeout=180, check=False
    )


def test_cli_chat_answers_once(model_dir, swarm):
    result = _cli(
        "chat",
        str(model_dir),
        "--initial-peers",
        swarm[0].maddr,
        "--dht-prefix",
        PREFIX,
        "--no-relay",
        "--no-auto-nat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens/s" in result.stderr


def test_cli_swarm_health_json(swarm):
    import json

    result = _cli("swarm", "--initial-peers", swarm[0].maddr, "--no-relay", "--no-auto-nat", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    (model,) = [m for m in json.loads(result.stdout) if m["dht_prefix"] == PREFIX]
    assert model["healthy"] and model["online_per_block"] == [1] * 6 and model["num_blocks"] == 6
    spans = sorted((s["start_block"], s["end_block"]) for s in model["servers"])
    assert spans == [(0, 2), (2, 4), (4, 6)]
    assert all(s["state"] == "ONLINE" and s["corolla_version"] and s["ping_ms"] is not None for s in model["servers"])
    text = _cli("swarm", "--initial-peers", swarm[0].maddr, "--no-relay", "--no-auto-nat")
    assert f"{PREFIX}: 6 blocks, healthy" in text.stdout and "coverage" in text.stdout


def test_session_rollback_matches_local(remote, local):
    ids = prompt(length=5, seed=11)
    a, b = torch.tensor([[17]]), torch.tensor([[42]])
    with remote.inference_session(max_length=16) as session:
        session.step(remote.client_parts.embed(ids))
        session.step(remote.client_parts.embed(a))
        session.rollback(5)
        hidden = session.step(remote.client_parts.embed(b))
        assert session.position == 6
    got = remote.client_parts.logits(hidden)[0, -1]
    want = local(torch.cat([ids, b], dim=1)).logits[0, -1]
    assert torch.allclose(got, want, atol=1e-4)


def test_blocked_and_allowed_servers(model_dir, swarm):
    blocked = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir,
        initial_peers=[swarm[0].maddr],
        dht_prefix=PREFIX,
        blocked_servers=[swarm[1].peer_id],
        **{**CLIENT_OPTIONS, "max_retries": 1},
    )
    try:
        with pytest.raises(MissingBlocksError, match=r"block\(s\) 2, 3"):
            blocked.route()
    finally:
        blocked.close()
    allowed = corolla.AutoDistributedModelForCausalLM.from_pretrained(
        model_dir,
        initial_peers=[swarm[0].maddr],
        dht_prefix=PREFIX,
        allowed_servers=[peer.peer_id for peer in swarm],
        **CLIENT_OPTIONS,
    )
    try:
        assert allowed.route().count("via") == 3
    finally:
        allowed.close()


def test_generate_stop_strings(remote):
    ids = prompt(seed=3)
    full = remote.generate(ids, max_new_tokens=10, eos_token_id=[])
    text = remote.tokenizer.decode(full[0, ids.shape[1] :])
    if len(text) < 4:
        pytest.skip("the random model produced too little text")
    stop = text[2:4]
    stopped = remote.generate(ids, max_new_tokens=10, eos_token_id=[], stop_strings=[stop])
    assert stopped.shape[1] < full.shape[1] and torch.equal(stopped, full[:, : stopped.shape[1]])


def test_servers_push_each_step_to_the_next_server(remote, local, swarm):
    """The client asks for server-to-server pushes; each server pushes to the next and the tokens
    are still exactly the local model's. Between these Corolla servers the pushes ride one open
    stream per pair (push_stream.py), once the sender has read from the DHT that the receiver is
    Corolla (the first pushes to a peer go by rpc_push meanwhile)."""
    time.sleep(1.5)  # the stats files are rewritten every second: let them count the previous tests' pushes
    growth = StatsGrowth(list(swarm))
    ids = prompt(seed=21)
    want = local.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(generate_pushing_every_hop(remote, ids, 12), want)

    def all_counted(grew: StatsGrowth) -> bool:
        # Each server rewrites its own stats file every second, so one may still show fewer pushes than
        # the next one already received from it: wait for all of them.
        sent, received = grew("pushes_sent"), grew("pushes_received")
        on_stream, taken = grew("pushes_sent_on_stream"), grew("pushes_received_on_stream")
        return min(sent[:2] + received[1:]) >= 10 and min(on_stream[:2] + taken[1:]) >= 5

    growth.wait_until(all_counted)
    sent, received = growth("pushes_sent"), growth("pushes_received")
    on_stream, taken = growth("pushes_sent_on_stream"), growth("pushes_received_on_stream")
    # 11 decode steps after the prompt; the last server has nobody to push to.
    assert sent[0] >= 10 and sent[1] >= 10 and sent[2] == 0, sent
    assert received[0] == 0 and received[1] >= 10 and received[2] >= 10, received
    assert on_stream[0] >= 5 and on_stream[1] >= 5 and taken[1] >= 5 and taken[2] >= 5, (on_stream, taken)
    assert on_stream[2] == 0 and taken[0] == 0


def test_generate_closes_its_sessions_behind_its_return(remote, local, swarm):
    """generate() returns before its sessions have closed (a round trip saved per call); the closes
    still finish, a generation started meanwhile gives the same tokens, and every server ends up
    with the sessions it had before."""
    remote._loop.wait_background()
    time.sleep(1.5)  # the stats files are rewritten every second
    before = [server.stats()["sessions_active"] for server in swarm]
    ids = prompt(seed=23)
    want = local.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    first = remote.generate(ids, max_new_tokens=6, do_sample=False)
    second = remote.generate(ids, max_new_tokens=6, do_sample=False)  # while the first may still be closing
    assert torch.equal(first, want) and torch.equal(second, want)
    remote._loop.wait_background()
    assert not remote._loop._background
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        active = [server.stats()["sessions_active"] for server in swarm]
        if active == before:
            break
        time.sleep(0.5)
    assert active == before


def test_speculative_steps_give_the_greedy_tokens_exactly(remote, local):
    """Prompt-lookup drafts (on by default for greedy decoding) go through the swarm as multi-token
    steps; rejected drafts are rolled back on the servers; the tokens equal the local model's."""
    base = prompt(seed=33, length=8)
    ids = torch.cat([base, base, base[:, :3]], dim=1)  # a repetitive text: drafts are found and kept
    want = local.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(ids))
    streamed = []
    got = remote.generate(ids, max_new_tokens=24, do_sample=False, streamer=lambda t: streamed.append(int(t[0])))
    assert torch.equal(got, want)
    assert streamed == want[0, ids.shape[1] :].tolist()  # every token reaches the callback, in order
    stats = remote.speculation.stats
    assert stats.steps > 0 and 0 < stats.accepted <= stats.drafted
    plain = remote.generate(ids, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=None)
    assert remote.speculation is None and torch.equal(plain, want)


def test_failed_drafts_back_off_exponentially():
    """Text that never repeats itself costs a handful of drafts: each pause after a failed probe is
    twice the last (capped), a probe with any acceptance goes on drafting, a good draft ends the backoff."""
    lookup = speculative.AdaptivePromptLookup(max_tokens=8, max_matching_ngram_size=3, max_length=1000)
    ids = torch.tensor([[5, 6, 7, 5, 6]])  # "5 6" was seen before: a draft is found

    def draft(accepted: int) -> int:
        """One verification step with a draft that kept `accepted` tokens; returns the pause that follows."""
        candidates, _ = lookup.get_candidates(ids)
        drafted = candidates.shape[1] - ids.shape[1]
        assert drafted > 0
        lookup.update_candidate_strategy(ids, None, min(accepted, drafted))
        paused = lookup._paused
        for _ in range(paused):  # paused steps draft nothing
            assert lookup.get_candidates(ids)[0].shape == ids.shape
        return paused

    pauses = [draft(0) for _ in range(7)]
    assert pauses == [0, 0, 8, 16, 32, 64, 64], pauses
    assert draft(1) == 0  # the probe kept a token: drafting goes on
    lookup.num_output_tokens = 1
    draft(1)  # a fully accepted draft: the next pause is short again
    assert max(draft(0) for _ in range(4)) == 8


def test_ngram_index_answers_as_a_scan_of_the_whole_sequence():
    """Whether a draft can be looked up (the last 2 tokens occurred before, with a token after them),
    answered from n-grams indexed as the sequence grows, equals a scan of the whole sequence."""

    def scanned(sequence: torch.Tensor, n: int) -> bool:
        return any(sequence[i : i + n].tolist() == sequence[-n:].tolist() for i in range(len(sequence) - n))

    generator = torch.Generator().manual_seed(35)
    for _ in range(50):
        sequence = torch.randint(0, 5, (50,), generator=generator)
        index, length = speculative.NgramIndex(2), 1
        while length <= len(sequence):
            assert index.seen_before(sequence[:length]) == scanned(sequence[:length], 2), sequence[:length]
            length += int(torch.randint(1, 4, (1,), generator=generator))  # one token, or an accepted draft
        shorter = sequence[:10]  # a new sequence (not a continuation): indexed afresh
        assert index.seen_before(shorter) == scanned(shorter, 2)


def test_speculative_sampling_goes_through_rollback(remote, local):
    """Sampling with drafts (asked for explicitly) keeps the model's distribution: at a temperature
    near zero that distribution is the greedy token's."""
    base = prompt(seed=34, length=8)
    ids = torch.cat([base, base, base[:, :3]], dim=1)
    want = local.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
    got = remote.generate(ids, max_new_tokens=16, do_sample=True, temperature=1e-4, seed=3, prompt_lookup_num_tokens=6)
    assert torch.equal(got, want)
    assert remote.speculation.stats.steps > 0
