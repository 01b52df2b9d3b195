"""A model whose blocks run in the swarm: the Python API, named as in Petals.

    from corolla import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained("repo/or/folder", initial_peers=[...])
    model.generate(input_ids, max_new_tokens=32)

The client holds only the client-side parts (embeddings, final norm, head); hivemind's P2P objects
live on one event loop in a background thread, and this class's methods are synchronous.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from corolla.swarm.client.config import ClientConfig
from corolla.swarm.client.generation import SamplingParams, StopChecker, next_tokens
from corolla.swarm.client.routing import SwarmView
from corolla.swarm.client.session import InferenceSession
from corolla.swarm.models import LoadOptions, load_client_parts, open_checkpoint, resolve_dht_prefix
from corolla.swarm.peers import start_dht

CANCEL_GRACE_S = 3.0  # for a cancelled coroutine to unwind (close its streams) before we move on


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="corolla-client", daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        """Run `coroutine` on the loop and wait for it. On a timeout or a Ctrl-C in the waiting thread the
        coroutine is cancelled (and given a moment to unwind) before the error propagates."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, KeyboardInterrupt):
            future.cancel()
            with contextlib.suppress(BaseException):
                concurrent.futures.wait([future], timeout=CANCEL_GRACE_S)
            raise

    def stop(self) -> None:
        """Cancel what still runs on the loop (quietly: no 'Task was destroyed' warnings), then stop it."""
        if not self.thread.is_alive():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)

        with contextlib.suppress(BaseException):
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(CANCEL_GRACE_S + 1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class RemoteSession:
    """A multi-step inference session (synchronous wrapper); use as a context manager."""

    def __init__(self, model: DistributedModelForCausalLM, max_length: int):
        self.model = model
        self.max_length = max_length
        self._session = InferenceSession(model.view, max_length)
        self.pending: torch.Tensor | None = None  # tokens generated but not yet sent to the servers

    @property
    def position(self) -> int:
        return self._session.position

    @property
    def route(self) -> str:
        return self._session.describe()

    @property
    def supports_rollback(self) -> bool:
        """True if every server on the route honours `start_from_position` (Petals 2.2 servers ignore it,
        and their version string cannot tell; Corolla servers announce `corolla_version`)."""
        spans = self.model.view.spans
        route = self._session.route
        return bool(route) and all(
            seg.peer_id in spans and spans[seg.peer_id].server_info.extra.get("corolla_version") for seg in route
        )

    @property
    def replacements(self) -> int:
        return self._session.replacements

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model._loop.run(self._session.step(hidden))

    def rollback(self, position: int) -> None:
        self.model._loop.run(self._session.rollback(position))
        self.pending = None

    def close(self, timeout: float | None = None) -> None:
        self.model._loop.run(self._session.close(), timeout)

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DistributedModelForCausalLM:
    def __init__(self, checkpoint, client_parts, dht, view: SwarmView, loop: _LoopThread, config: ClientConfig):
        self.checkpoint, self.client_parts, self.dht = checkpoint, client_parts, dht
        self.view, self._loop, self.client_config = view, loop, config
        self.config = checkpoint.config
        self._tokenizer = None

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike,
        *,
        initial_peers: list[str],
        dht_prefix: str | None = None,
        torch_dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        token: str | None = None,
        revision: str | None = None,
        client_config: ClientConfig | None = None,
        **config_overrides: Any,
    ) -> DistributedModelForCausalLM:
        config = client_config or ClientConfig()
        for key, value in config_overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown client option {key!r}")
            setattr(config, key, value)
        if not initial_peers:
            raise ValueError("initial_peers is empty: give the multiaddrs of at least one peer of the swarm")
        checkpoint = open_checkpoint(model_name_or_path, token=token, revision=revision)
        prefix = resolve_dht_prefix(checkpoint, dht_prefix or config.dht_prefix)
        client_parts = load_client_parts(
            checkpoint, LoadOptions(device=device, dtype=torch_dtype, token=token, revision=revision)
        )
        dht = start_dht(
            initial_peers,
            client_mode=True,
            host_maddrs=config.host_maddrs,
            use_relay=config.use_relay,
            auto_nat=config.auto_nat,
        )
        loop = _LoopThread()
        try:
            p2p = loop.run(dht.replicate_p2p(), timeout=60)
            view = SwarmView(dht, p2p, prefix, checkpoint.num_blocks, config)
        except BaseException:
            loop.stop()
            dht.shutdown()
            raise
        return cls(checkpoint, client_parts, dht, view, loop, config)

    # --- plumbing ----------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.checkpoint.fetch_tokenizer_files()))
        return self._tokenizer

    @property
    def dht_prefix(self) -> str:
        return self.view.dht_prefix

    def route(self, max_length: int | None = None) -> str:
        """A readable description of the route a new session would take now."""
        self._loop.run(self.view.refresh())
        from corolla.swarm.client.routing import describe_route

        return describe_route(self.view.route(0, self.view.num_blocks, max_length))

    def inference_session(self, max_length: int) -> RemoteSession:
        return RemoteSession(self, max_length)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run(self.view.p2p.shutdown(), timeout=10)
        self._loop.stop()
        self.dht.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- model ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of `input_ids` (one throwaway session)."""
        with self.inference_session(max_length=input_ids.shape[1]) as session:
            hidden = session.step(self.client_parts.embed(input_ids))
        return self.client_parts.logits(hidden)

    __call__ = forward

    @functools.cached_property
    def eos_token_ids(self) -> list[int]:
        """From generation_config.json if the checkpoint has one (chat models list several), else config."""
        eos = None
        with contextlib.suppress(Exception):
            path = self.checkpoint.resolver.local_path("generation_config.json")
            if path is not None:
                eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        stop_strings: list[str] | None = None,
        streamer: Callable[[torch.Tensor], bool | None] | None = None,
        session: RemoteSession | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Greedy or sampled generation; returns `input_ids` followed by the new tokens.

        `streamer(tokens)` gets each new [batch] token tensor (returning True stops early);
        `session` continues a multi-turn session (its position and cache are reused).
        """
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed).validate()
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, length] with length >= 1")
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        eos = (
            self.eos_token_ids
            if eos_token_id is None
            else (eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
        )
        stop = StopChecker(eos, stop_strings, self.tokenizer if stop_strings else None)
        own_session = session is None
        if own_session:
            session = self.inference_session(max_length=input_ids.shape[1] + max_new_tokens)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (eos[0] if eos else 0)
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        try:
            with rng:
                if seed is not None:
                    torch.manual_seed(seed)
                # The whole loop runs on the client's event loop: one thread hop per generation, not per token.
                return self._loop.run(
                    self._generate_loop(input_ids, session, params, stop, max_new_tokens, pad, streamer, should_stop)
                )
        finally:
            if own_session:
                session.close()

    async def _generate_loop(self, input_ids, session, params, stop, max_new_tokens, pad, streamer, should_stop):
        processors = params.processors()
        batch = input_ids.shape[0]
        sequences = input_ids
        to_send = input_ids if session.pending is None else torch.cat([session.pending, input_ids], dim=1)
        session.pending = None
        unfinished = torch.ones(batch, dtype=torch.bool)
        new_tokens: list[list[int]] = [[] for _ in range(batch)]
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                hidden = await session._session.step(self.client_parts.embed(to_send))
            logits = self.client_parts.logits(hidden[:, -1:])[:, -1]
            tokens = next_tokens(logits, sequences, params, processors)
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
            sequences = torch.cat([sequences, tokens[:, None]], dim=1)
            for row in range(batch):
                if unfinished[row]:
                    new_tokens[row].append(int(tokens[row]))
                    if stop.is_eos(int(tokens[row])) or stop.stop_string_hit(new_tokens[row]):
                        unfinished[row] = False
            to_send = tokens[:, None]
            if streamer is not None and streamer(tokens) is True:
                break
            if not bool(unfinished.any()) or (should_stop is not None and should_stop()):
                break
        session.pending = to_send  # the last token was never sent: the next turn sends it first
        return sequences


class AutoDistributedModelForCausalLM(DistributedModelForCausalLM):
    """The Petals name: `AutoDistributedModelForCausalLM.from_pretrained(...)`."""
