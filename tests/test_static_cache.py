"""The static (preallocated) KV cache equals the dynamic one, bit for bit, for every family; the
fixed-shape step that CUDA graphs capture equals it within float32 rounding; capacity errors are clear.

The reference for a rollback is what failover does: replay the session's steps into a fresh dynamic
cache, with the same step boundaries (so every matmul has the same shape) and the hypo_ids reorders,
which permute the whole history of the kept rows.
"""

from __future__ import annotations

import pytest
import torch

from corolla.swarm.models import load_span, open_checkpoint
from corolla.swarm.models.cache import SessionCache
from corolla.swarm.models.decode_graph import FixedShapeStep, GraphedDecoder
from corolla.swarm.models.errors import CacheCapacityError
from corolla.swarm.models.static_cache import StaticSessionCache
from corolla.swarm.models.tiny import PRESETS

BATCH, PREFILL, DECODE_STEPS, MAX_LENGTH = 2, 7, 20, 48
# Step index -> what happens before that step: rollbacks (one past every tiny sliding window of 4,
# which the dynamic cache cannot undo in place), hypo_ids reorders, and a 3-token speculative step.
ROLLBACKS = {5: 9, 15: 8}  # step boundaries: the prefill is 7 tokens, decode steps 1
REORDERS = {6: [1, 0], 9: [0, 0], 17: [1, 1]}
MULTI_TOKEN = {12: 3}


class ReplayingDynamic:
    """A dynamic-cache session that rolls back by replaying its steps into a new cache."""

    def __init__(self, span):
        self.span, self.events, self.cache = span, [], span.new_cache()

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        self.events.append(("step", hidden))
        return self.span(hidden, self.cache)

    def reorder(self, hypo_ids: torch.Tensor) -> None:
        self.events.append(("reorder", hypo_ids))
        self.cache.cache.reorder_cache(hypo_ids)

    def rollback(self, position: int) -> None:
        events, self.events, self.cache = self.events, [], self.span.new_cache()
        kept_all = False
        for kind, value in events:
            if kind == "reorder":
                self.reorder(value)
            elif not kept_all and self.cache.length + value.shape[1] <= position:
                self.step(value)
            else:
                kept_all = True
        assert self.cache.length == position


def _span(tiny_models, preset):
    return load_span(open_checkpoint(tiny_models.get(preset)), 1, 5)


def _session(span, run_step, cache, reference: ReplayingDynamic) -> float:
    """Prefill + DECODE_STEPS steps through `run_step(hidden)` on `cache`; the worst abs difference."""
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(BATCH, PREFILL, span.hidden_size, generator=generator)
    worst = (reference.step(hidden) - span(hidden, cache)).abs().max().item()
    for index in range(DECODE_STEPS):
        if index in ROLLBACKS:
            reference.rollback(ROLLBACKS[index])
            cache.rollback(ROLLBACKS[index])
        if index in REORDERS:
            hypo_ids = torch.tensor(REORDERS[index])
            reference.reorder(hypo_ids)
            cache.cache.reorder_cache(hypo_ids)
        hidden = torch.randn(BATCH, MULTI_TOKEN.get(index, 1), span.hidden_size, generator=generator)
        expected, got = reference.step(hidden), run_step(hidden)
        assert got.shape == expected.shape
        worst = max(worst, (got - expected).abs().max().item())
    assert cache.length == reference.cache.length
    return worst


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_static_cache_equals_dynamic_exactly(tiny_models, preset):
    span = _span(tiny_models, preset)
    cache = span.new_cache(MAX_LENGTH, static=True)
    assert isinstance(cache, StaticSessionCache)
    worst = _session(span, lambda hidden: span(hidden, cache), cache, ReplayingDynamic(span))
    assert worst == 0.0, f"{preset}: max abs diff {worst}"
    assert cache.nbytes() == span.static_cache_bytes(BATCH, MAX_LENGTH)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fixed_shape_step_matches_dynamic(tiny_models, preset):
    """The body CUDA graphs capture (positions from a device scalar, masks over the whole buffer),
    run eagerly on the CPU: equal to the dynamic path up to float32 rounding."""
    span = _span(tiny_models, preset)
    cache = span.new_cache(MAX_LENGTH, static=True)
    steps: dict[int, FixedShapeStep] = {}

    def run_step(hidden):
        with torch.inference_mode():
            step = steps.setdefault(hidden.shape[1], FixedShapeStep(span, cache, hidden.shape[1]))
            return step.run_eagerly(cache, hidden)

    worst = _session(span, run_step, cache, ReplayingDynamic(span))
    assert worst <= 1e-5, f"{preset}: max abs diff {worst}"


def test_a_step_that_outgrows_the_cache_gets_a_clear_error(tiny_models):
    span = _span(tiny_models, "llama")
    cache = span.new_cache(8, static=True)
    span(torch.randn(2, 6, span.hidden_size), cache)
    with pytest.raises(CacheCapacityError, match="do not fit: the cache holds 6 of at most 8"):
        span(torch.randn(2, 3, span.hidden_size), cache)
    with pytest.raises(CacheCapacityError, match="batch of 2, the step has 3"):
        span(torch.randn(3, 1, span.hidden_size), cache)
    assert cache.length == 6  # a refused step leaves the cache as it was
    out = span(torch.randn(2, 2, span.hidden_size), cache)
    assert out.shape == (2, 2, span.hidden_size) and cache.length == 8


def test_a_closed_session_frees_its_cache_at_once(tiny_models):
    """No reference cycle: the buffers go with the last reference, not at a later garbage collection."""
    import gc
    import weakref

    span = _span(tiny_models, "llama")
    cache = span.new_cache(16, static=True)
    span(torch.randn(1, 4, span.hidden_size), cache)
    with torch.inference_mode():
        FixedShapeStep(span, cache, 1).run_eagerly(cache, torch.randn(1, 1, span.hidden_size))
    keys = weakref.ref(cache.cache.layers[1].keys)
    gc.disable()
    try:
        del cache
        assert keys() is None
    finally:
        gc.enable()


def test_which_cache_a_session_gets(tiny_models):
    span = _span(tiny_models, "llama")
    assert isinstance(span.new_cache(), SessionCache)  # no max_length: nothing to preallocate
    assert isinstance(span.new_cache(0), SessionCache)  # a session that reserves no cache
    # On the CPU the static cache measured faster only for sessions that may grow long.
    assert isinstance(span.new_cache(64), SessionCache)
    assert isinstance(span.new_cache(1024), StaticSessionCache)
    assert not isinstance(span.new_cache(1024).decoder, GraphedDecoder)  # CUDA graphs only on a GPU
    enough = span.static_cache_bytes(2, 1024)
    assert isinstance(span.new_cache(1024, batch=2, reserved_bytes=enough), StaticSessionCache)
    assert isinstance(span.new_cache(1024, batch=2, reserved_bytes=enough - 1), SessionCache)
    # Falcon's new architecture caches keys widened to every head: more than Petals' accounting
    # reserves for it, so its sessions keep the growing cache.
    falcon = _span(tiny_models, "falcon")
    assert falcon.static_cache_bytes(1, 64) == 2 * falcon.family.kv_dim(falcon.config) * 64 * 4 * 4 * 2
    assert falcon.new_cache(1024).__class__ is StaticSessionCache
    reserved = 1024 * 4 * 2 * falcon.family.kv_dim(falcon.config) * 4
    assert isinstance(falcon.new_cache(1024, reserved_bytes=reserved), SessionCache)
