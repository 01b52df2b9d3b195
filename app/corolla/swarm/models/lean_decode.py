"""The lean CPU decode path: a session's token step through Llama-shaped blocks in a handful of torch ops.

Why: on the CPU a decode step of a small span is almost all Python. A cProfile of the benchmarks' tiny
Llama span (4 blocks, hidden 64, float32, one thread, a quiet 2-core EPYC) gave 0.89 ms per one-token
step through transformers' layers, of which the torch ops that do the work (7 linears, 2 RMSNorms,
rotary, the cache append, attention, SiLU, 2 residual adds per block) take about a third. The rest is
the layer code around them: 53 `nn.Module.__call__`s per step (hooks, tracing-state checks), the
`deprecate_kwarg` wrappers on every layer and attention call, the attention-interface lookup and
`sdpa_attention_forward`'s checks, config `__getattribute__` overrides, kwargs plumbing, the rotary
`rotate_half` slices and concatenations, and the RMSNorm written as five ops.

What this path cuts, from those figures: every module call (it calls `F.linear` on each projection's own
weight and bias), the wrappers, the attention dispatch (one `scaled_dot_product_attention`), and the
kwargs. It keeps what carries the numbers: the span's own `rotary_emb` module computes cos/sin (every
rope scaling type, dynamic ones included, stays right), the cache layer's own `update` appends the keys
and values (a dynamic or a static cache, so a session mixes this path and the transformers one freely,
and rollbacks and hypo_ids reorders work as before), and the same ops in the same order as transformers'
Llama layer, so results match it to rounding (bit for bit on the float32 and bfloat16 models of
tests/test_lean_decode.py). Two ops are rewritten, value for value: `rotate_half(x) * sin` is `roll(x) *
signed_sin` (negation is exact), and in float32 the RMSNorm is the fused `torch.rms_norm` (10 us against
15 us for the five ops; other dtypes keep transformers' five ops, whose rounding differs). Then, from a
profile of this path: one rotary pass over queries and keys side by side, no transposes in one-token
steps, 2D rows so that F.linear skips matmul's folding (1.3 us a linear), and cos/sin read from tables
of 128 positions that a span's sessions share where the rope frequencies are fixed (a rotary call cost
25 us a step). What is left is the ops themselves: the fused RMSNorm is still six kernels on the CPU (a
third of the step), each linear about 2.5 us.

Measured (benchmarks/lean_decode.py, same run, alternated; sample in lean_decode.sample.json): the
tiny Llama span step 0.86 -> 0.39 ms (one token) and 1.08 -> 0.53 ms (4 tokens); SmolLM2-135M's 30
blocks 44.6 -> 39.1 ms, where the matmuls dominate; client tokens/s through 1 / 2 / 3 loopback servers
425 / 248 / 185 -> 474 / 290 / 223 (load average 1.9-2.7 on 2 shared cores).

Which spans take it (`why_not_lean`): Llama, Mistral and Qwen2 blocks whose every layer is the plain
Llama layer: RMSNorm, q/k/v/o projections as plain `nn.Linear` (bias or not), rotary positions, GQA,
a SiLU-gated MLP, full attention. Everything else keeps transformers' layers: sliding windows,
softcapping and extra norms (Gemma, Qwen3's q/k norms), fused projections (Phi-3), experts (Mixtral),
alibi (BLOOM, Falcon), quantized linears (bitsandbytes' classes subclass nn.Linear, so the check is on
the exact type), and LoRA adapters (their wrapper is not an nn.Linear). Only token steps after the
prefill take it (1 to `MAX_LEAN_TOKENS` tokens, no padding mask, no explicit positions, no deep
prompts, no gradients: span.py decides); `COROLLA_LEAN_DECODE=0` turns it off for comparison.

No weight is copied (memory matters on a contributor's machine): the plan holds references to the
layers' own parameters, built per session (a span whose linears an adapter later wraps gets no plan).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from corolla.swarm.models.family import FULL_ATTENTION

LEAN_DECODE_ENV = "COROLLA_LEAN_DECODE"
# Steps up to this many tokens: decode and speculative steps; longer ones are compute, not overhead.
MAX_LEAN_TOKENS = 16
# cos/sin tables of this many positions, at most this many kept per rotary module (shared by the
# span's sessions): 32 x 128 positions x 128 dims x 2 x 4 bytes = 4 MiB at most for a large head.
ROTARY_TABLE = 128
MAX_ROTARY_TABLES = 32
_ROTARY_TABLES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()

_FAMILIES = frozenset({"llama", "mistral", "qwen"})
# transformers' classes whose forward is exactly the Llama layer computed below (Mistral's and Qwen2's
# attention differ from Llama's only in passing a sliding window, None on full-attention layers).
_LAYER_CLASSES = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
_ATTENTION_CLASSES = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention"})
_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP"})
_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
_ATTENTION_PARTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
_MLP_PARTS = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})
_LAYER_PARTS = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})


def lean_decode_enabled() -> bool:
    return os.environ.get(LEAN_DECODE_ENV, "1") != "0"


@dataclass(frozen=True)
class LeanLayer:
    """References to one block's own tensors (no copies) and the shapes its step needs."""

    cache_index: int
    input_norm: torch.Tensor
    input_eps: float
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    post_norm: torch.Tensor
    post_eps: float
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


def _linear(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if type(module) is not nn.Linear or module.weight.dtype != dtype or module.weight.is_meta:
        return None
    return module.weight, module.bias


def _span_check(span) -> str | None:
    if span.family.name not in _FAMILIES:
        return f"the {span.family.name} family's layers are not the plain Llama layer"
    if span.device.type != "cpu":
        return f"the lean path runs on the CPU, not {span.device.type}"
    if span.quantization != "none":
        return f"{span.quantization} quantized linears"
    if any(layer_type != FULL_ATTENTION for layer_type in span.layer_types):
        return "sliding-window layers"
    if span.rotary_emb is None:
        return "no rotary embedding"
    if getattr(span.config, "hidden_act", None) != "silu":
        return f"activation {getattr(span.config, 'hidden_act', None)!r}"
    return None


def why_not_lean(span) -> str | None:
    """Why `span` cannot take the lean path (None: it can)."""
    reason = _span_check(span)
    if reason is not None:
        return reason
    for index, layer in enumerate(span.layers):
        if _layer_plan(span, layer, span.start + index) is None:
            return f"block {span.start + index} is not a plain Llama layer (adapters or other modules)"
    return None


def lean_plan(span) -> list[LeanLayer] | None:
    """The span's plan (references to its own weights), or None where `why_not_lean` says why not.
    Built per session (about 30 us a block), so a linear an adapter wraps later is seen."""
    if _span_check(span) is not None:
        return None
    plan = []
    for index, layer in enumerate(span.layers):
        layer_plan = _layer_plan(span, layer, span.start + index)
        if layer_plan is None:
            return None
        plan.append(layer_plan)
    return plan


def _layer_plan(span, layer: nn.Module, cache_index: int) -> LeanLayer | None:
    # `_modules` directly: nn.Module.__getattr__ made this check cost 45 us a block.
    parts = layer._modules
    if type(layer).__name__ not in _LAYER_CLASSES or parts.keys() != _LAYER_PARTS:
        return None
    attn, mlp = parts["self_attn"], parts["mlp"]
    norms = (parts["input_layernorm"], parts["post_attention_layernorm"])
    if type(attn).__name__ not in _ATTENTION_CLASSES or attn._modules.keys() != _ATTENTION_PARTS:
        return None
    if type(mlp).__name__ not in _MLP_CLASSES or mlp._modules.keys() != _MLP_PARTS:
        return None
    if type(mlp._modules["act_fn"]).__name__ not in ("SiLUActivation", "SiLU"):
        return None
    if any(type(norm).__name__ not in _NORM_CLASSES or norm.weight.dtype != span.dtype for norm in norms):
        return None
    if not getattr(attn, "is_causal", False) or getattr(attn, "sliding_window", None) is not None:
        return None
    linears = [_linear(attn._modules[name], span.dtype) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [_linear(mlp._modules[name], span.dtype) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(linear is None for linear in linears):
        return None
    head_dim = int(attn.head_dim)
    heads = linears[0][0].shape[0] // head_dim
    kv_heads = linears[1][0].shape[0] // head_dim
    if heads * head_dim != linears[0][0].shape[0] or heads % kv_heads or heads != kv_heads * attn.num_key_value_groups:
        return None
    return LeanLayer(
        cache_index,
        norms[0].weight,
        float(norms[0].variance_epsilon),
        *linears[:4],
        norms[1].weight,
        float(norms[1].variance_epsilon),
        *linears[4:],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scaling=float(attn.scaling),
    )


class LeanDecoder:
    """One session's lean steps (its cache holds it, as it would hold the CUDA graphs)."""

    def __init__(self, span, layers: list[LeanLayer]):
        self.span, self.layers = span, layers
        half = layers[0].head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated), value for value.
        self._sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(span.dtype)
        self._half = half
        self._fused_norm = span.dtype == torch.float32
        rope_type = str(getattr(span.rotary_emb, "rope_type", "dynamic"))
        # Frequencies that never change with the sequence length: cos/sin can be computed ahead.
        self._tables = None if "dynamic" in rope_type or rope_type == "longrope" else _tables_of(span.rotary_emb)

    def wants(self, cache, hidden: torch.Tensor) -> bool:
        """A token step after the prefill (span.py has checked: no mask, positions, prompts or grad)."""
        return (
            1 <= hidden.shape[1] <= MAX_LEAN_TOKENS
            and hidden.device.type == "cpu"
            and hidden.dtype == self.span.dtype
            and cache.length > 0
        )

    def step(self, cache, hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden.shape
        past = cache.length
        cos, sin = self._rotary(hidden, past, tokens)  # [1, 1, tokens, head_dim]
        mask = None
        if tokens > 1:  # query i sees the past and new tokens up to itself
            mask = torch.arange(past + tokens) <= (past + torch.arange(tokens)).unsqueeze(-1)
        kv_layers = cache.cache.layers
        norm = self._norm
        half = self._half
        rows = batch * tokens
        hidden = hidden.reshape(rows, hidden.shape[-1])  # 2D: F.linear skips matmul's folding (1.3 us each)
        for layer in self.layers:
            heads, kv_heads, head_dim = layer.heads, layer.kv_heads, layer.head_dim
            residual = hidden
            x = norm(hidden, layer.input_norm, layer.input_eps)
            # Queries and keys side by side: one rotary pass for both.
            qk = torch.cat([F.linear(x, *layer.q), F.linear(x, *layer.k)], dim=-1)
            v = F.linear(x, *layer.v)
            if tokens == 1:  # [batch, heads * dim] is already [batch, heads, 1, dim] in memory
                qk = qk.view(batch, heads + kv_heads, 1, head_dim)
                v = v.view(batch, kv_heads, 1, head_dim)
            else:
                qk = qk.view(batch, tokens, heads + kv_heads, head_dim).transpose(1, 2)
                v = v.view(batch, tokens, kv_heads, head_dim).transpose(1, 2)
            qk = qk * cos + qk.roll(half, -1) * sin
            keys, values = kv_layers[layer.cache_index].update(qk[:, heads:], v)
            attn = F.scaled_dot_product_attention(
                qk[:, :heads], keys, values, attn_mask=mask, scale=layer.scaling, enable_gqa=heads != kv_heads
            )
            if tokens == 1:
                attn = attn.reshape(rows, heads * head_dim)
            else:
                attn = attn.transpose(1, 2).reshape(rows, heads * head_dim)
            hidden = residual + F.linear(attn, *layer.o)
            residual = hidden
            x = norm(hidden, layer.post_norm, layer.post_eps)
            x = F.linear(F.silu(F.linear(x, *layer.gate)) * F.linear(x, *layer.up), *layer.down)
            hidden = residual + x
        hidden = hidden.view(batch, tokens, hidden.shape[-1])
        self.span.fast_path.lean_steps += 1
        return hidden

    def _rotary(self, hidden: torch.Tensor, past: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of the step's positions, from a table of `ROTARY_TABLE` positions the
        span's sessions share where the frequencies are fixed (one rotary call per table, not per step)."""
        first = past - past % ROTARY_TABLE
        if self._tables is None or past + tokens > first + ROTARY_TABLE:
            return self._cos_sin(hidden, past, tokens)
        key = (first, hidden.dtype, self.span.rotary_emb.inv_freq.data_ptr())
        table = self._tables.get(key)
        if table is None:
            table = self._cos_sin(hidden, first, ROTARY_TABLE)
            while len(self._tables) >= MAX_ROTARY_TABLES:
                self._tables.pop(next(iter(self._tables)), None)
            self._tables[key] = table
        cos, sin = table
        offset = past - first
        return cos[:, :, offset : offset + tokens], sin[:, :, offset : offset + tokens]

    def _cos_sin(self, hidden: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.span.rotary_emb(hidden, torch.arange(first, first + count).unsqueeze(0))
        return cos.unsqueeze(1), (sin * self._sign).unsqueeze(1)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self._fused_norm:
            return torch.rms_norm(x, (x.shape[-1],), weight, eps)
        # transformers' order: in float32, back to the input dtype, then the weight.
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)


def _tables_of(rotary_emb: nn.Module) -> dict:
    tables = _ROTARY_TABLES.get(rotary_emb)
    if tables is None:
        tables = _ROTARY_TABLES[rotary_emb] = {}
    return tables


def lean_decoder(span) -> LeanDecoder | None:
    """A session's lean decoder where the span takes the lean path and it is not turned off."""
    if not lean_decode_enabled():
        return None
    layers = lean_plan(span)
    return LeanDecoder(span, layers) if layers else None
