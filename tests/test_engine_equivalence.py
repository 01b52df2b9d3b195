"""Full-model logits equal client -> span[0:2] -> span[2:4] -> span[4:6] -> client, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from corolla.swarm.models import load_client_parts, load_span, open_checkpoint
from corolla.swarm.models.tiny import PRESETS

TOLERANCE = 1e-5
DECODE_STEPS = 5
SPLITS = [(0, 2), (2, 4), (4, 6)]


def _reference_model(folder, family):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=family.attn_implementation
    ).eval()


def _positions(mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    # The rule generate() uses: cumulative count of real tokens, padding at position 1.
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    return positions[:, -new_tokens:]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("batch", [1, 2])
def test_chained_spans_match_full_model(tiny_models, preset, batch):
    folder = tiny_models.get(preset)
    checkpoint = open_checkpoint(folder)
    reference = _reference_model(folder, checkpoint.family)
    client = load_client_parts(checkpoint)
    spans = [load_span(checkpoint, a, b) for a, b in SPLITS]
    caches = [span.new_cache() for span in spans]
    reference_cache = DynamicCache(config=reference.config)

    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(6, 500, (batch, 7), generator=generator)
    mask = torch.ones(batch, 7, dtype=torch.long)
    if batch == 2:
        mask[1, :3] = 0  # left padding, as in batched generation
    worst = 0.0
    for _ in range(1 + DECODE_STEPS):
        positions = _positions(mask, ids.shape[1])
        with torch.no_grad():
            expected = reference(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=reference_cache, use_cache=True
            ).logits
        hidden = client.embed(ids)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache, attention_mask=mask, position_ids=positions)
        got = client.logits(hidden)
        assert got.shape == expected.shape
        worst = max(worst, (got - expected).abs().max().item())
        ids = expected[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
    assert worst <= TOLERANCE, f"{preset} batch {batch}: max abs diff {worst}"
    assert all(cache.length == 7 + DECODE_STEPS for cache in caches)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_petals_style_steps_without_mask_or_positions(tiny_models, preset):
    """The Petals wire carries no mask and no positions: the span derives them from its cache."""
    folder = tiny_models.get(preset)
    checkpoint = open_checkpoint(folder)
    reference = _reference_model(folder, checkpoint.family)
    client = load_client_parts(checkpoint)
    spans = [load_span(checkpoint, 0, 3), load_span(checkpoint, 3, 6)]
    caches = [span.new_cache() for span in spans]
    ids = torch.randint(6, 500, (1, 5), generator=torch.Generator().manual_seed(3))
    full = ids
    for _ in range(4):
        hidden = client.embed(ids)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache)
        next_token = client.logits(hidden)[:, -1:].argmax(-1)
        full = torch.cat([full, next_token], dim=1)
        ids = next_token
    with torch.no_grad():
        expected = reference.generate(
            full[:, :5], max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(full[:, :5])
        )
    assert torch.equal(full, expected)
