"""The CPU's lean decode path (models/lean_decode.py) equals transformers' layers to float32 rounding,
over whole sessions (decode and speculative steps, rollbacks, hypo_ids reorders, steps that must take
the transformers path in between) on dynamic and static caches; only plain Llama-shaped spans take it.

The reference is the same span with the path turned off (COROLLA_LEAN_DECODE=0), fed the same steps.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from corolla.swarm.models import load_span, open_checkpoint
from corolla.swarm.models.family import family_for
from corolla.swarm.models.lean_decode import (
    LEAN_DECODE_ENV,
    ROTARY_TABLE,
    LeanDecoder,
    lean_plan,
    why_not_lean,
)
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.models.tiny import PRESETS

# Far below the float32 spot-check tolerance of swarm/client/verification.py (0.005).
MAX_RELATIVE_ERROR = 1e-5
BATCH, PREFILL = 2, 7
# Step index -> what happens before it: a rollback to a position (a rejected draft), a hypo_ids
# reorder; and the tokens of each step (speculative steps of 3 and 9), and steps that carry explicit
# positions, which the lean path leaves to transformers' layers over the same cache.
ROLLBACKS = {6: 9, 14: 12, 21: 10}
REORDERS = {4: [1, 0], 11: [0, 0]}
TOKENS = {3: 3, 9: 9, 17: 16, 19: 17}
EXPLICIT_POSITIONS = {8, 15}
STEPS = 26

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_hidden_layers=4,
    vocab_size=128,
    max_position_embeddings=256,
    initializer_range=0.2,
)


def span_from_config(config, start: int = 0, end: int | None = None, dtype: torch.dtype = torch.float32) -> BlockSpan:
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    end = config.num_hidden_layers if end is None else end
    layers = nn.ModuleList(list(model.model.layers)[start:end])
    family = family_for(config.model_type)
    return BlockSpan(family, config, start, end, layers, model.model.rotary_emb, torch.device("cpu"), dtype)


def new_cache(span, static: bool, lean: bool, monkeypatch):
    monkeypatch.setenv(LEAN_DECODE_ENV, "1" if lean else "0")
    cache = span.new_cache(64, static=static) if static else span.new_cache()
    assert isinstance(cache.decoder, LeanDecoder) == lean
    return cache


def run_sessions(span, lean_cache, reference_cache, steps: int = STEPS) -> float:
    """The same session on both caches; the worst relative error of any step's output."""
    generator = torch.Generator().manual_seed(3)
    worst = 0.0
    for index in range(-1, steps):
        if index in ROLLBACKS:
            for cache in (lean_cache, reference_cache):
                cache.rollback(ROLLBACKS[index])
        if index in REORDERS:
            for cache in (lean_cache, reference_cache):
                cache.cache.reorder_cache(torch.tensor(REORDERS[index]))
        tokens = PREFILL if index < 0 else TOKENS.get(index, 1)
        hidden = torch.randn(BATCH, tokens, span.hidden_size, generator=generator)
        positions = None
        if index in EXPLICIT_POSITIONS:
            positions = torch.arange(lean_cache.length, lean_cache.length + tokens).unsqueeze(0)
        got = span(hidden, lean_cache, position_ids=positions)
        expected = span(hidden, reference_cache, position_ids=positions)
        assert got.shape == expected.shape
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    assert lean_cache.length == reference_cache.length
    for index in range(span.start, span.end):
        lean_layer, reference_layer = lean_cache.cache.layers[index], reference_cache.cache.layers[index]
        length = reference_cache.length
        for name in ("keys", "values"):
            a, b = getattr(lean_layer, name)[:, :, :length], getattr(reference_layer, name)[:, :, :length]
            assert ((a - b).abs().max() / b.abs().max()).item() <= MAX_RELATIVE_ERROR
    return worst


CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "llama-mha": lambda: LlamaConfig(**COMMON, num_key_value_heads=4),
    "llama-mqa-bias": lambda: LlamaConfig(**COMMON, num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    "llama-head-dim": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, head_dim=32),
    "llama3-rope": lambda: LlamaConfig(
        **COMMON,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama-dynamic-rope": lambda: LlamaConfig(
        **{**COMMON, "max_position_embeddings": 24},
        num_key_value_heads=2,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "qwen2-bias": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "mistral-no-window": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
}


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lean_steps_equal_transformers_layers(name, static, monkeypatch):
    span = span_from_config(CONFIGS[name]())
    assert why_not_lean(span) is None
    lean = new_cache(span, static, True, monkeypatch)
    reference = new_cache(span, static, False, monkeypatch)
    before = span.fast_path.lean_steps
    worst = run_sessions(span, lean, reference)
    assert worst <= MAX_RELATIVE_ERROR, f"{name}: max relative error {worst}"
    # Every step after the prefill of at most 16 tokens without explicit positions took the lean path.
    lean_steps = [i for i in range(STEPS) if i not in EXPLICIT_POSITIONS and TOKENS.get(i, 1) <= 16]
    assert span.fast_path.lean_steps - before == len(lean_steps)


def test_a_sub_span_in_the_middle_of_the_model_writes_its_own_cache_layers(monkeypatch):
    span = span_from_config(CONFIGS["llama-gqa"](), 1, 3)
    worst = run_sessions(span, new_cache(span, False, True, monkeypatch), new_cache(span, False, False, monkeypatch))
    assert worst <= MAX_RELATIVE_ERROR


def test_bfloat16_steps_keep_transformers_rounding(monkeypatch):
    """In bfloat16 the RMSNorm keeps transformers' five ops (the fused one rounds differently), and the
    results stay as close as in float32 (equal, on this model)."""
    span = span_from_config(CONFIGS["llama-gqa"](), dtype=torch.bfloat16)
    assert why_not_lean(span) is None
    lean, reference = new_cache(span, False, True, monkeypatch), new_cache(span, False, False, monkeypatch)
    generator = torch.Generator().manual_seed(6)
    for tokens in (5, 1, 1, 3, 1):
        hidden = torch.randn(1, tokens, span.hidden_size, generator=generator).to(torch.bfloat16)
        got, expected = span(hidden, lean), span(hidden, reference)
        assert got.dtype == torch.bfloat16
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= MAX_RELATIVE_ERROR


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-rope"])
def test_steps_across_the_shared_rotary_tables(name, monkeypatch):
    """cos/sin come from tables of ROTARY_TABLE positions: steps inside one, straddling two, in the next."""
    span = span_from_config(CONFIGS[name]())
    lean, reference = new_cache(span, False, True, monkeypatch), new_cache(span, False, False, monkeypatch)
    generator = torch.Generator().manual_seed(4)
    worst = 0.0
    for tokens in [ROTARY_TABLE - 3, 1, 4, 1, 3, 1, 1]:  # 125, 126, 130 (across 128), 131, 134, ...
        hidden = torch.randn(1, tokens, span.hidden_size, generator=generator)
        got, expected = span(hidden, lean), span(hidden, reference)
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    assert worst <= MAX_RELATIVE_ERROR


def test_the_plan_holds_the_layers_own_weights_not_copies():
    span = span_from_config(CONFIGS["llama-mqa-bias"]())
    plan = lean_plan(span)
    own = {p.data_ptr() for p in span.layers.parameters()}
    held = {t.data_ptr() for layer in plan for t in _tensors(layer)}
    assert held == own


def _tensors(layer):
    for value in vars(layer).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, tuple):
            yield from (t for t in value if t is not None)


# Which tiny presets (6 blocks, span 1:5) take the lean path: Llama only. Mistral's and Qwen2's
# presets have sliding windows; the others are not plain Llama layers.
LEAN_PRESETS = {"llama", "llama-tied"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_only_plain_llama_shaped_spans_take_the_lean_path(tiny_models, preset, monkeypatch):
    monkeypatch.delenv(LEAN_DECODE_ENV, raising=False)
    span = load_span(open_checkpoint(tiny_models.get(preset)), 1, 5)
    reason = why_not_lean(span)
    assert (reason is None) == (preset in LEAN_PRESETS), reason
    assert isinstance(span.new_cache().decoder, LeanDecoder) == (preset in LEAN_PRESETS)
    assert isinstance(span.new_cache(2048).decoder, LeanDecoder) == (preset in LEAN_PRESETS)  # static on the CPU
    if preset == "qwen2":  # its first half is full attention: a span there takes the lean path
        assert why_not_lean(load_span(open_checkpoint(tiny_models.get(preset)), 0, 3)) is None


def test_adapters_and_the_switch_keep_the_transformers_path(tiny_models, monkeypatch):
    from corolla.swarm.server.adapters import LoraLinear

    span = load_span(open_checkpoint(tiny_models.get("llama")), 0, 3)
    monkeypatch.setenv(LEAN_DECODE_ENV, "0")
    assert span.new_cache().decoder is None
    monkeypatch.delenv(LEAN_DECODE_ENV)
    assert isinstance(span.new_cache().decoder, LeanDecoder)
    attention = span.layers[1].self_attn
    attention.q_proj = LoraLinear(attention.q_proj)
    assert "block 1" in why_not_lean(span) and span.new_cache().decoder is None


@pytest.mark.skipif(not os.environ.get("COROLLA_TEST_SMOLLM2"), reason="COROLLA_TEST_SMOLLM2 is not set")
def test_smollm2_real_weights(monkeypatch):
    span = load_span(open_checkpoint(os.environ["COROLLA_TEST_SMOLLM2"]), 0, 30)
    assert why_not_lean(span) is None
    lean = new_cache(span, False, True, monkeypatch)
    reference = new_cache(span, False, False, monkeypatch)
    worst = run_sessions(span, lean, reference, steps=12)
    assert worst <= MAX_RELATIVE_ERROR, f"max relative error {worst}"
