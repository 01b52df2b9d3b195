"""The distributed model as a transformers model: transformers' own generate() through the session's
3 Corolla servers equals local generate() token for token (float32), for every decoding strategy and
argument."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

import corolla
from corolla.swarm.client.generation import SwarmCache
from corolla.swarm.client.remote_model import step_output
from corolla.testing.swarm import TINY_SWARM_PREFIX

PREFIX = TINY_SWARM_PREFIX
CLIENT_OPTIONS = {"use_relay": False, "auto_nat": False, "request_timeout": 20.0, "max_retries": 3, "min_backoff": 0.2}
NO_EOS = {"eos_token_id": None, "pad_token_id": 3}


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


def generate_both(remote, local, ids, seed=None, **kwargs):
    results = []
    for model in (remote, local):
        if seed is not None:
            torch.manual_seed(seed)
        results.append(model.generate(ids, **dict(kwargs)))
    return results


def test_is_a_transformers_model(remote):
    assert isinstance(remote, PreTrainedModel)
    assert remote.can_generate()


def test_min_new_tokens_is_accepted_and_greedy_equals_local(remote, local):
    for batch in (1, 2):
        ids = prompt(batch)
        got, want = generate_both(
            remote, local, ids, max_new_tokens=10, min_new_tokens=10, attention_mask=torch.ones_like(ids), **NO_EOS
        )
        assert got.shape == (batch, 16)
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "options",
    [
        dict(do_sample=True, temperature=0.7, top_k=20),
        dict(do_sample=True, top_p=0.8),
        dict(do_sample=True, min_p=0.05, temperature=1.3),
        dict(repetition_penalty=1.3),
        dict(no_repeat_ngram_size=2),
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    ],
    ids=["top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram", "beams", "beams_returned"],
)
def test_decoding_strategies_equal_local(remote, local, options):
    ids = prompt(batch=2, length=5, seed=3)
    got, want = generate_both(
        remote, local, ids, seed=77, max_new_tokens=8, attention_mask=torch.ones_like(ids), **NO_EOS, **options
    )
    assert torch.equal(got, want)


def test_eos_stops_rows_and_pads_like_local(remote, local):
    ids = prompt(batch=2, length=5, seed=8)
    free = local.generate(ids, max_new_tokens=6, attention_mask=torch.ones_like(ids), **NO_EOS)
    eos = int(free[0, 7])  # a token row 0 produces: it ends row 0 early
    got, want = generate_both(
        remote, local, ids, max_new_tokens=6, attention_mask=torch.ones_like(ids), eos_token_id=eos, pad_token_id=3
    )
    assert torch.equal(got, want)


def test_stopping_criteria_and_logits_processor(remote, local):
    class BanToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 100:300] = -float("inf")
            return scores

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)

    ids = prompt(length=5, seed=11)
    got, want = generate_both(
        remote,
        local,
        ids,
        max_new_tokens=12,
        attention_mask=torch.ones_like(ids),
        logits_processor=LogitsProcessorList([BanToken()]),
        stopping_criteria=StoppingCriteriaList([StopAfter()]),
        **NO_EOS,
    )
    assert got.shape[1] == 9 and torch.equal(got, want)
    assert not bool(((got[:, 5:] >= 100) & (got[:, 5:] < 300)).any())


def test_generation_config_object(remote, local):
    config = GenerationConfig(
        max_new_tokens=7, do_sample=True, temperature=0.9, top_k=30, repetition_penalty=1.2, **NO_EOS
    )
    ids = prompt(length=4, seed=12)
    got, want = generate_both(remote, local, ids, seed=5, generation_config=config, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want)


def test_text_streamers(remote, local, capsys):
    tokenizer = remote.tokenizer
    ids = prompt(length=4, seed=13)
    want = local.generate(ids, max_new_tokens=6, attention_mask=torch.ones_like(ids), **NO_EOS)
    remote.generate(ids, max_new_tokens=6, streamer=TextStreamer(tokenizer), **NO_EOS)
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(want[0], skip_special_tokens=True).strip()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(out=remote.generate(ids, max_new_tokens=6, streamer=streamer, **NO_EOS))
    )
    worker.start()
    text = "".join(streamer)
    worker.join(60)
    assert torch.equal(result["out"], want)
    assert text == tokenizer.decode(want[0, 4:], skip_special_tokens=True)


def test_padded_batch_with_attention_mask(remote, local):
    ids = prompt(batch=3, length=7, seed=14)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 3)
    for options in (dict(), dict(do_sample=True, top_k=10), dict(num_beams=2)):
        got, want = generate_both(
            remote, local, ids, seed=9, max_new_tokens=6, attention_mask=mask, **NO_EOS, **options
        )
        assert torch.equal(got, want), options


def test_corolla_extras_on_top(remote, local):
    ids = prompt(length=5, seed=15)
    a = remote.generate(ids, do_sample=True, temperature=0.8, max_new_tokens=6, seed=1234, eos_token_id=[])
    b = remote.generate(ids, do_sample=True, temperature=0.8, max_new_tokens=6, seed=1234, eos_token_id=[])
    torch.manual_seed(1234)
    want = local.generate(
        ids, do_sample=True, temperature=0.8, max_new_tokens=6, attention_mask=torch.ones_like(ids), **NO_EOS
    )
    assert torch.equal(a, b) and torch.equal(a, want)
    seen = []
    out = remote.generate(ids, max_new_tokens=10, eos_token_id=[], streamer=lambda t: seen.append(t) or len(seen) == 3)
    assert out.shape[1] == 5 + 3 and len(seen) == 3


def test_session_reuse_across_turns(remote, local):
    first, second = prompt(length=4, seed=16), prompt(length=3, seed=17)
    with remote.inference_session(max_length=40) as session:
        turn1 = remote.generate(first, max_new_tokens=5, eos_token_id=[], session=session)
        turn2 = remote.generate(second, max_new_tokens=5, eos_token_id=[], session=session)
        assert session.position == 4 + 5 + 3 + 4
    whole = torch.cat([turn1, second], dim=1)
    want = local.generate(whole, max_new_tokens=5, attention_mask=torch.ones_like(whole), **NO_EOS)
    assert torch.equal(turn2[:, -5:], want[:, -5:])


def test_forward_returns_logits_and_loss(remote, local):
    ids = prompt(batch=2, length=9, seed=18)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    got = remote(ids, attention_mask=mask, labels=ids)
    want = local(ids, attention_mask=mask, labels=ids)
    assert torch.allclose(got.logits, want.logits, atol=1e-4)
    assert abs(got.loss.item() - want.loss.item()) < 1e-4


def test_step_output_is_the_causal_lm_output_transformers_builds():
    logits, cache = torch.randn(2, 1, 7), object()
    fast, slow = step_output(logits, cache), CausalLMOutputWithPast(logits=logits, cache=cache)
    assert type(fast) is type(slow)
    assert list(fast.keys()) == list(slow.keys()) == ["logits", "cache"]
    assert vars(fast) == vars(slow)
    assert fast.to_tuple() == slow.to_tuple()
    assert fast["cache"] is cache and fast.get("cache") is cache and fast.logits is logits and fast.loss is None


def test_generation_hooks_pass_a_step_only_what_it_uses(remote):
    """The per-step hooks send only the new tokens; an unpadded batch's mask and the position ids are
    dropped after its first step, a padded batch's mask grows with every token."""
    ids = prompt(batch=2, length=5, seed=19)
    for padded in (False, True):
        mask = torch.ones_like(ids)
        if padded:
            mask[1, :2] = 0
        kwargs = {"attention_mask": mask, "position_ids": mask.cumsum(-1) - 1, "use_cache": True, "logits_to_keep": 1}
        with remote.inference_session(max_length=8, batch_size=2) as session:
            cache = SwarmCache(session)
            inputs = remote.prepare_inputs_for_generation(ids, cache=cache, **kwargs)
            assert set(inputs) == {"input_ids", "cache", "attention_mask", "use_cache", "logits_to_keep"}
            out = remote(**inputs)
            assert out.logits.shape == (2, 1, remote.config.vocab_size)
            kwargs = remote._update_model_kwargs_for_generation(out, {"cache": cache, **kwargs})
            assert kwargs["position_ids"] is None
            if padded:
                assert torch.equal(kwargs["attention_mask"], torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1))
            else:
                assert kwargs["attention_mask"] is None
            longer = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            inputs = remote.prepare_inputs_for_generation(longer, next_sequence_length=1, **kwargs)
            assert torch.equal(inputs["input_ids"], longer[:, -1:])
            remote(**inputs)
            assert session.position == 6


def test_padded_batch_long_greedy_with_scores_equals_local(remote, local):
    ids = prompt(batch=2, length=6, seed=20)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 3)
    options = dict(max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True, output_scores=True, **NO_EOS)
    got = remote.generate(ids, attention_mask=mask, **options)
    want = local.generate(ids, attention_mask=mask, **options)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got.scores, want.scores, strict=True))
