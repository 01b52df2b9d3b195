"""Token steps of several sessions in one forward (swarm/models/batched_step.py) equal each session's
steps alone, for every family: caches of different lengths, padding masks, beams (batch > 1)."""

from __future__ import annotations

import pytest
import torch

from corolla.swarm.models import load_span, open_checkpoint
from corolla.swarm.models.batched_step import StepRow, can_join, forward_joined
from corolla.swarm.models.tiny import PRESETS

PROMPT_LENGTHS = [3, 9, 5, 1]
STEPS = 6


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("step_length", [1, 3])
def test_joint_steps_equal_steps_alone(tiny_models, preset, step_length):
    """Dynamic and static caches side by side (every other session static), one-token steps and
    three-token drafts; the tiny presets' sliding windows (4) are outgrown by the longer prompts."""
    span = load_span(open_checkpoint(tiny_models.get(preset)), 0, 6)
    generator = torch.Generator().manual_seed(3)
    hidden_size = span.hidden_size
    max_length = max(PROMPT_LENGTHS) + STEPS * step_length
    alone = [span.new_cache(max_length, static=i % 2 == 1) for i, _ in enumerate(PROMPT_LENGTHS)]
    joined = [span.new_cache(max_length, static=i % 2 == 1) for i, _ in enumerate(PROMPT_LENGTHS)]
    for length, a, b in zip(PROMPT_LENGTHS, alone, joined, strict=True):
        prompt = torch.randn(1, length, hidden_size, generator=generator)
        span(prompt, a)
        span(prompt, b)
    worst = 0.0
    for _ in range(STEPS):
        steps = [torch.randn(1, step_length, hidden_size, generator=generator) for _ in PROMPT_LENGTHS]
        expected = [span(h, cache) for h, cache in zip(steps, alone, strict=True)]
        assert all(can_join(span, cache, step_length) for cache in joined)
        got = forward_joined(span, [StepRow(cache, h) for h, cache in zip(steps, joined, strict=True)])
        for want, have, a, b in zip(expected, got, alone, joined, strict=True):
            assert have.shape == want.shape
            worst = max(worst, (have - want).abs().max().item())
            assert a.length == b.length
    assert worst < 1e-4, f"{preset}: joint steps differ from steps alone by {worst}"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_steps_of_different_lengths_share_a_forward(tiny_models, preset):
    """One-token steps beside drafts of two and three tokens, padded to the longest in one forward."""
    span = load_span(open_checkpoint(tiny_models.get(preset)), 0, 6)
    generator = torch.Generator().manual_seed(11)
    size = span.hidden_size
    alone = [span.new_cache(64, static=i == 2) for i in range(len(PROMPT_LENGTHS))]
    joined = [span.new_cache(64, static=i == 2) for i in range(len(PROMPT_LENGTHS))]
    for length, a, b in zip(PROMPT_LENGTHS, alone, joined, strict=True):
        prompt = torch.randn(1, length, size, generator=generator)
        span(prompt, a)
        span(prompt, b)
    for turn in range(STEPS):
        lengths = [1 + (turn + i) % 3 for i in range(len(PROMPT_LENGTHS))]
        steps = [torch.randn(1, n, size, generator=generator) for n in lengths]
        expected = [span(h, cache) for h, cache in zip(steps, alone, strict=True)]
        got = forward_joined(span, [StepRow(cache, h) for h, cache in zip(steps, joined, strict=True)])
        for want, have, a, b in zip(expected, got, alone, joined, strict=True):
            assert have.shape == want.shape and a.length == b.length
            assert (have - want).abs().max() < 1e-4, preset


def test_rows_with_their_own_masks_and_beams(tiny_models):
    """A session with left padding of its own (batch 2) beside a plain one."""
    span = load_span(open_checkpoint(tiny_models.get("llama")), 0, 6)
    generator = torch.Generator().manual_seed(5)
    size = span.hidden_size
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded_prompt = torch.randn(2, 5, size, generator=generator)
    plain_prompt = torch.randn(1, 7, size, generator=generator)

    def positions(mask, length):
        full = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return full[:, -length:]

    caches = {name: [span.new_cache(static=False) for _ in range(2)] for name in ("alone", "joined")}
    for pair in caches.values():
        span(padded_prompt, pair[0], attention_mask=mask, position_ids=positions(mask, 5))
        span(plain_prompt, pair[1])
    for _ in range(4):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        h1, h2 = torch.randn(2, 1, size, generator=generator), torch.randn(1, 1, size, generator=generator)
        a1 = span(h1, caches["alone"][0], attention_mask=mask, position_ids=positions(mask, 1))
        a2 = span(h2, caches["alone"][1])
        j1, j2 = forward_joined(
            span,
            [
                StepRow(caches["joined"][0], h1, mask, positions(mask, 1)),
                StepRow(caches["joined"][1], h2),
            ],
        )
        assert (j1 - a1).abs().max() < 1e-4 and (j2 - a2).abs().max() < 1e-4


def test_what_cannot_join(tiny_models):
    span = load_span(open_checkpoint(tiny_models.get("llama")), 0, 6)
    empty = span.new_cache(static=False)
    assert not can_join(span, empty, 1)  # nothing cached yet: a prefill runs alone
    static = span.new_cache(4, static=True)
    span(torch.randn(1, 2, span.hidden_size), static)
    assert can_join(span, static, 2)
    assert not can_join(span, static, 3)  # past its max_length: the step is refused alone
    other = span.sub(0, 3).new_cache(static=False)
    span.sub(0, 3)(torch.randn(1, 2, span.hidden_size), other)
    assert not can_join(span, other, 1)  # a cache of another span


def test_steps_longer_than_a_sliding_window_run_alone(tiny_models):
    span = load_span(open_checkpoint(tiny_models.get("mistral")), 0, 6)
    window = span.config.sliding_window  # 4 in the tiny preset: the tests' prompts outgrow it
    cache = span.new_cache(static=False)
    span(torch.randn(1, 2, span.hidden_size), cache)
    assert can_join(span, cache, window - 1)
    assert not can_join(span, cache, window)


def test_batcher_joins_waiting_steps_and_isolates_a_bad_one(tiny_models):
    """The server's batcher over a real compute thread: steps that wait together share a forward,
    the oldest goes first, and a step that breaks the joint forward fails alone."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from corolla.swarm.models.errors import EngineError
    from corolla.swarm.server.compute_queue import ComputeQueue, Priority
    from corolla.swarm.server.stats import ServerStats
    from corolla.swarm.server.step_batcher import StepBatcher

    span = load_span(open_checkpoint(tiny_models.get("llama")), 0, 6)
    size = span.hidden_size
    stats = ServerStats()

    async def scenario():
        queue = ComputeQueue(ThreadPoolExecutor(max_workers=1))
        batcher = StepBatcher(
            run_on_thread=lambda job: queue.run(job, Priority.INFERENCE),
            bytes_per_token=1024,
            stats=stats,
        )
        caches = [span.new_cache(static=False) for _ in range(5)]
        twins = [span.new_cache(static=False) for _ in range(4)]  # the same sessions, run alone
        for i, cache in enumerate(caches):
            prompt = torch.randn(1, 3, size)
            span(prompt, cache)
            if i < 4:
                span(prompt, twins[i])
        # Hold the compute thread so that all five steps are waiting when it frees up.
        blocker = asyncio.ensure_future(queue.run(lambda: __import__("time").sleep(0.3), Priority.INFERENCE))
        await asyncio.sleep(0.05)
        good = [torch.randn(1, 1, size) for _ in range(4)]
        bad = torch.randn(1, 1, size + 1)  # the wrong hidden size: breaks a joint forward
        tasks = [batcher.step(span, None, StepRow(c, h)) for c, h in zip(caches, [*good, bad], strict=True)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await blocker
        expected = [span(h, twin) for h, twin in zip(good, twins, strict=True)]
        return caches, expected, results

    caches, expected, results = asyncio.run(scenario())
    assert isinstance(results[4], EngineError)
    assert caches[4].length == 3  # the bad step changed nothing
    for out, want, cache in zip(results[:4], expected, caches[:4], strict=True):
        assert isinstance(out, torch.Tensor) and (out - want).abs().max() < 1e-5
        assert cache.length == 4
    # All five were taken together; the joint forward failed, so each ran alone.
    assert stats.token_steps == 5 and stats.joint_forwards == 0 and stats.step_forwards == 5
    assert stats.batch_sizes["5-8"] == 1
