"""The CUDA decode fast path: a session's step of a few tokens, captured as a CUDA graph and replayed.

Per token, an eager step launches hundreds of small kernels from Python (an 8-block Llama-3-8B span:
42 ms of wall time for 3 ms of kernels on an H200). A CUDA graph launches them all at once.

How it fits together:
- `FixedShapeStep` is the span's step over a `StaticSessionCache` in fixed shape: the new tokens'
  positions come from a device scalar, the cache writes land at that position and attention reads the
  whole preallocated buffer under masks built from it, so no shape, address or Python value changes
  from one token to the next. It runs eagerly on any device (the CPU tests check it there).
- `GraphedDecoder` (one per session, on its cache) captures one graph per step length (1 to
  `MAX_GRAPH_TOKENS` tokens: decode and small speculative steps), checks the first replay against
  the eager warm-up of the same step, and replays it for every later step of that length.

Why per session and not shared per batch-size bucket: a graph bakes in the addresses of the cache it
reads, and each session's cache is its own; the session's bucket is the shape its cache was allocated
for (batch, max_length), fixed at open. A step that outgrows it (another batch, more tokens than
max_length) gets `CacheCapacityError`. Prefill, padded steps, deep prompts and steps of more tokens
stay on the eager path over the same cache.

Why hand-made graphs rather than `torch.compile(mode="reduce-overhead")`: no compile stall when a
session starts (minutes for a span, per shape), no Triton dependency on contributors' machines, and a
graph of exactly the eager kernels, so its output is the eager one. benchmarks/gpu_engine_check.py
measures transformers' static cache + compile beside it.

Any failure to capture (a kernel that syncs with the host, as bitsandbytes' LLM.int8 outlier split
does, or the data-dependent expert routing of a mixture of experts) sends the session to the eager
path with one log line, and repeated failures turn the fast path off for the span: never a wrong
answer, since the first replay of every graph is checked against the eager step it replaces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from corolla.swarm.models.errors import CacheCapacityError
from corolla.swarm.models.family import SLIDING_ATTENTION, LayerCallContext
from corolla.swarm.models.static_cache import StaticSessionCache

logger = logging.getLogger(__name__)

MAX_GRAPH_TOKENS = 8
# The first replay must reproduce the eager warm-up of the same step (same kernels, same inputs);
# anything further off means the capture went wrong, and the graph is dropped.
REPLAY_CHECK_RTOL = 1e-3
MAX_CAPTURE_FAILURES = 3


@dataclass
class DecodeFastPath:
    """What the sessions of one loaded span share: the graphs' memory pool, and whether capture works.

    A failed capture sends that session's steps to the eager path, with one log line; after
    `MAX_CAPTURE_FAILURES` failures (a kernel that can never be captured, not a passing collision
    with another thread's work) no session of the span tries again.
    """

    enabled: bool = True
    disabled_reason: str | None = None
    pool: object | None = None
    captures: int = 0
    replays: int = 0
    failures: int = 0
    last_failure: str | None = None
    lean_steps: int = 0  # steps the CPU's lean path ran (lean_decode.py)

    def capture_failed(self, reason: str) -> None:
        self.failures, self.last_failure = self.failures + 1, reason
        logger.warning("CUDA-graph capture failed, the session's steps run eagerly: %s", reason)
        if self.enabled and self.failures >= MAX_CAPTURE_FAILURES:
            self.enabled, self.disabled_reason = False, reason
            logger.warning("CUDA-graph decode disabled for this span after %d failed captures", self.failures)


def fixed_masks(span, positions: torch.Tensor, max_length: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive masks [1, 1, tokens, max_length] per layer type: query i at position p sees cache slots
    j <= p (and j > p - window on sliding layers)."""
    slots = torch.arange(max_length, device=positions.device)
    query = positions.unsqueeze(-1)
    visible = slots <= query
    minimum = torch.finfo(dtype).min
    masks = {}
    for layer_type in span._span_layer_types:
        allowed = visible
        window = getattr(span.config, "sliding_window", None)
        if layer_type == SLIDING_ATTENTION and window is not None:
            allowed = visible & (slots > query - window)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(~allowed, minimum)
        masks[layer_type] = mask[None, None]
    return masks


class FixedShapeStep:
    """One step of `tokens` new tokens over a session's static cache in fixed shape; inputs go into
    `hidden_in`. It holds the cache's layers and shared state, not the session cache itself (which
    holds the graphs that hold this): no reference cycle keeps a closed session's memory."""

    def __init__(self, span, cache: StaticSessionCache, tokens: int):
        self.span, self.tokens = span, tokens
        self.kv, self.state, self.max_length = cache.cache, cache.state, cache.max_length
        self.hidden_in = torch.zeros((cache.batch_size, tokens, span.hidden_size), dtype=span.dtype, device=span.device)
        self.offsets = torch.arange(tokens, device=span.device)

    def __call__(self) -> torch.Tensor:
        span = self.span
        positions = self.state.position + self.offsets
        hidden = self.hidden_in
        ctx = LayerCallContext(
            config=span.config,
            rotary_emb=span.rotary_emb,
            hidden_states=hidden,
            cache=self.kv,
            attention_mask=None,
            position_ids=positions.unsqueeze(0),
            layer_types=span._span_layer_types,
            fixed_masks=fixed_masks(span, positions, self.max_length, span.dtype),
        )
        kwargs_by_type = span.family.layer_kwargs(ctx)
        for layer, layer_type in zip(span.layers, span.layer_types, strict=True):
            out = layer(hidden, **kwargs_by_type[layer_type])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def start(self, cache: StaticSessionCache, hidden: torch.Tensor) -> None:
        """Load this step's inputs and position, and put the cache in fixed shape."""
        self.hidden_in.copy_(hidden)
        self.state.position.fill_(cache.length)
        self.state.fixed_shape = True

    def run_eagerly(self, cache: StaticSessionCache, hidden: torch.Tensor) -> torch.Tensor:
        """The step without a graph (what a replay computes), advancing the cache."""
        self.start(cache, hidden)
        try:
            out = self()
        finally:
            self.state.fixed_shape = False
        cache.advance(self.tokens)
        return out


@dataclass
class _Captured:
    step: FixedShapeStep
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor


class GraphedDecoder:
    """The CUDA graphs of one session, by step length (the session's cache holds it)."""

    def __init__(self, span, shared: DecodeFastPath):
        self.span, self.shared = span, shared
        self._graphs: dict[int, _Captured] = {}
        self.eager_only = False  # this session's capture failed

    def wants(self, cache: StaticSessionCache, hidden: torch.Tensor) -> bool:
        """Whether this step goes through a graph: a few tokens, after the prefill, graphs working."""
        return (
            self.shared.enabled
            and not self.eager_only
            and cache.is_allocated
            and 1 <= hidden.shape[1] <= MAX_GRAPH_TOKENS
            and hidden.device.type == "cuda"
        )

    def step(self, cache: StaticSessionCache, hidden: torch.Tensor) -> torch.Tensor | None:
        """The step's output through a graph; None when it must run eagerly (capture failed)."""
        tokens = hidden.shape[1]
        check_fits(cache, hidden)
        captured = self._graphs.get(tokens)
        if captured is None:
            return self._capture(cache, hidden)
        captured.step.start(cache, hidden)
        captured.step.state.fixed_shape = False  # a replay runs no Python: the flag is for eager calls
        captured.graph.replay()
        cache.advance(tokens)
        self.shared.replays += 1
        return captured.out.clone()  # the next replay overwrites `out`

    def _capture(self, cache: StaticSessionCache, hidden: torch.Tensor) -> torch.Tensor | None:
        tokens = hidden.shape[1]
        step = FixedShapeStep(self.span, cache, tokens)
        step.start(cache, hidden)
        try:
            # Warm up on a side stream (lazy cuBLAS and allocator set-up must not be captured). The
            # warm-up is the real step: it writes this step's keys and values, which the replay rewrites.
            side = torch.cuda.Stream(device=hidden.device)
            side.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(side):
                expected = step().clone()
            torch.cuda.current_stream(hidden.device).wait_stream(side)
            if self.shared.pool is None:
                self.shared.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.shared.pool, capture_error_mode="thread_local"):
                out = step()
            graph.replay()
            error = ((out.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
            if not error <= REPLAY_CHECK_RTOL:
                raise RuntimeError(f"the replay differs from the eager step (relative error {error:.3g})")
        except Exception as exc:  # whatever the cause, this step and this session run eagerly
            self.eager_only = True
            self.shared.capture_failed(f"{type(exc).__name__}: {str(exc)[:300]}")
            return None  # the eager step rewrites the same cache slots
        finally:
            step.state.fixed_shape = False
        self._graphs[tokens] = _Captured(step, graph, out)
        self.shared.captures += 1
        cache.advance(tokens)
        return out.clone()


def check_fits(cache: StaticSessionCache, hidden: torch.Tensor) -> None:
    """A step that outgrows the session's bucket (its batch) or its cache (max_length) is refused."""
    batch, tokens = hidden.shape[:2]
    if batch != cache.batch_size:
        raise CacheCapacityError(
            f"this session's cache was allocated for a batch of {cache.batch_size}, the step has {batch}"
        )
    if cache.length + tokens > cache.max_length:
        raise CacheCapacityError(
            f"the step's {tokens} tokens do not fit: the cache holds {cache.length} of at most {cache.max_length}"
        )
