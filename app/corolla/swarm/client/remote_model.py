"""A transformers model whose decoder blocks run in the swarm: the Python API, named as in Petals.

    from corolla import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained("repo/or/folder", initial_peers=[...])
    model.generate(input_ids, max_new_tokens=32)          # transformers' own generate()
    model(input_ids, attention_mask=mask, labels=labels).loss.backward()  # through rpc_forward/backward

It is a `PreTrainedModel` + `GenerationMixin`: the client holds the client-side parts (embeddings,
final norm, head) and, with `tuning_mode="ptune"`/`"deep_ptune"`, trainable prompts. `generate()`
feeds transformers' decoding loop from a swarm inference session (SwarmCache); training calls run
stateless forward/backward RPCs. hivemind's P2P objects live on one event loop in a background
thread; this class's methods are synchronous.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.swarm import steptrace
from corolla.swarm.client import route_choice, speculative
from corolla.swarm.client.autograd import remote_blocks
from corolla.swarm.client.config import ClientConfig
from corolla.swarm.client.generation import CallbackStopping, SwarmCache, TokenCallbackStopping, generation_length
from corolla.swarm.client.local_edges import LocalEdges, LocalEdgesError, check_edge_blocks
from corolla.swarm.client.privacy import Privacy, as_privacy
from corolla.swarm.client.prompts import PromptTuning
from corolla.swarm.client.remote_forward import RemoteBlocks
from corolla.swarm.client.routing import SwarmView
from corolla.swarm.client.session import CLOSE_TIMEOUT, InferenceSession
from corolla.swarm.client.verification import LiarCaught, restart_route
from corolla.swarm.models import LoadOptions, load_client_parts, open_checkpoint, resolve_dht_prefix
from corolla.swarm.peers import start_dht

logger = logging.getLogger(__name__)
TUNING_MODES = (None, "ptune", "deep_ptune")
# generate()'s per-step keywords that a swarm step has no use for (positions follow the servers' caches).
_NOT_FORWARDED = frozenset({"labels", "next_sequence_length", "position_ids", "token_type_ids", "past_key_values"})
MAX_LIAR_RESTARTS = 3  # a generation re-runs at most this often after servers caught lying
CANCEL_GRACE_S = 3.0  # for a cancelled coroutine to unwind (close its streams) before we move on
# Sessions generate() closes behind its return, at most this many at once; past it a close is awaited
# (a swarm that never answers a close must not pile up streams). Each close is bounded by its streams'
# CLOSE_TIMEOUT; the model's close() waits up to BACKGROUND_CLOSE_WAIT_S for them before shutting down.
MAX_BACKGROUND_CLOSES = 8
BACKGROUND_CLOSE_WAIT_S = 2 * CLOSE_TIMEOUT


class _LoopThread:
    """The client's event loop, run by a background thread, or lent to one caller thread at a time.

    A call from another thread normally hops to the loop thread and back (~0.1 ms, two thread
    wake-ups). generate() borrows the loop instead: its thread runs the loop itself during each step,
    so a token costs no hop. Meanwhile other threads' calls still run, whenever the borrower drives
    the loop (most of a step's time is spent waiting on the servers, inside the loop).
    """

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._driver = threading.Lock()  # held by whichever thread runs the loop
        self._borrow = threading.Lock()  # one borrower at a time
        self._lent = threading.Event()  # the background thread has stopped running the loop for a borrower
        self._returned = threading.Event()
        self._closed = False
        self._local = threading.local()
        self._background: set[concurrent.futures.Future] = set()  # closes still running (close_later)
        self._background_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="corolla-client", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._closed:
            with self._driver:
                if self._closed:
                    return
                self.loop.run_forever()  # until a borrower's (or stop()'s) loop.stop
            self._lent.set()
            self._returned.wait()  # lent out: wait until the borrower gives it back
            self._returned.clear()

    def run(self, coroutine, timeout: float | None = None):
        """Run `coroutine` on the loop and wait for it. On a timeout or a Ctrl-C in the waiting thread the
        coroutine is cancelled (and given a moment to unwind) before the error propagates. On a stopped
        loop it fails at once (nothing would ever run the coroutine)."""
        if self._closed:
            coroutine.close()
            raise RuntimeError("the swarm client was closed")
        if getattr(self._local, "borrowed", False):
            task = self.loop.create_task(coroutine if timeout is None else asyncio.wait_for(coroutine, timeout))
            try:
                return self.loop.run_until_complete(task)
            except KeyboardInterrupt:
                task.cancel()
                with contextlib.suppress(BaseException):
                    self.loop.run_until_complete(asyncio.wait({task}, timeout=CANCEL_GRACE_S))
                raise
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, KeyboardInterrupt):
            future.cancel()
            with contextlib.suppress(BaseException):
                concurrent.futures.wait([future], timeout=CANCEL_GRACE_S)
            raise

    def close_later(self, coroutine) -> bool:
        """Run a close on the loop without waiting for it; False (nothing started) when too many are
        already in flight, and the caller closes in the foreground instead."""
        with self._background_lock:
            if self._closed or len(self._background) >= MAX_BACKGROUND_CLOSES:
                coroutine.close()
                return False
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
            self._background.add(future)
        future.add_done_callback(self._forget)
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._background_lock:
            self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.debug("a background session close failed: %s", future.exception())

    def wait_background(self, timeout: float = BACKGROUND_CLOSE_WAIT_S) -> None:
        """Wait (bounded) for the closes close_later started: the servers free their sessions now."""
        with self._background_lock:
            pending = list(self._background)
        if pending and not getattr(self._local, "borrowed", False):
            concurrent.futures.wait(pending, timeout=timeout)

    @contextlib.contextmanager
    def borrowed(self):
        """Within this block, this thread runs the loop for its own calls (if no one else borrows it)."""
        if self._closed or getattr(self._local, "borrowed", False) or not self._borrow.acquire(blocking=False):
            yield
            return
        try:
            # The stop is consumed by the background thread's run_forever (never by ours): wait for it.
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._lent.wait()
            self._lent.clear()
            self._driver.acquire()
            self._local.borrowed = True
            try:
                yield
            finally:
                self._local.borrowed = False
                self._driver.release()
                self._returned.set()
        finally:
            self._borrow.release()

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
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._returned.set()
        self.thread.join(5)


class RemoteSession:
    """A multi-step inference session (synchronous wrapper); use as a context manager."""

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        max_length: int,
        prompts: torch.Tensor | None = None,
        privacy: Privacy | None = None,
    ):
        self.model = model
        self.max_length = max_length
        view = model.view.under(privacy)
        edges = model.local_edges
        self._session = InferenceSession(
            view,
            max_length,
            adapter=model.active_adapter,
            prompts=prompts,
            blocks=edges.remote_range if edges is not None else None,
        )
        self._prompts = prompts
        self._edges = edges.session() if edges is not None else None  # caches of the blocks run here
        self.pending: torch.Tensor | None = None  # tokens generated but not yet sent to the servers
        self.speculated = speculative.SpeculationStats()  # drafts of this session's generations so far

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

    @property
    def privacy(self) -> Privacy:
        return self._session.view.privacy

    @property
    def recipients(self) -> dict[str, set[tuple[int, int]]]:
        """Every server that received this session's hidden states: peer id -> block ranges."""
        return self._session.recipients

    def server_names(self) -> dict[str, str]:
        """The public names the servers this session used announce (peer id -> name)."""
        spans = {**self.model.view.spans, **self._session.view.spans}
        return {
            peer: str(span.server_info.public_name or "")
            for peer, span in spans.items()
            if peer in self._session.recipients
        }

    @property
    def padded(self) -> bool:
        """The batch has padding: every step carries the attention mask."""
        return self._session.padded

    def step(
        self,
        hidden: torch.Tensor,
        *,
        hypo_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self._edges is None:
            return self.model._loop.run(self._session.step(hidden, hypo_ids=hypo_ids, attention_mask=attention_mask))
        position = self._session.position
        if self._edges.position != position:  # a failed step or a restart left them apart
            self._edges.rollback(position)
        try:
            hidden = self._edges.before(hidden, hypo_ids=hypo_ids, mask=attention_mask, prompts=self._prompts)
            out = self.model._loop.run(self._session.step(hidden, hypo_ids=hypo_ids, attention_mask=attention_mask))
            return self._edges.after(out, mask=attention_mask, prompts=self._prompts)
        except BaseException:
            self._edges.rollback(position)  # the swarm did not take this step: neither do the edges
            raise

    @property
    def local_blocks(self) -> str | None:
        """Which blocks ran on this computer (None: all went to the swarm)."""
        return self.model.local_edges.describe() if self._edges is not None else None

    def rollback(self, position: int) -> None:
        self.model._loop.run(self._session.rollback(position))
        if self._edges is not None:
            self._edges.rollback(position)
        self.pending = None

    def close(self, timeout: float | None = None) -> None:
        if self.model._loop.closed:
            return  # the client closed first: its streams ended with its connections (e.g. settings changed)
        self.model._loop.run(self._session.close(), timeout)

    def close_in_background(self) -> None:
        """Close without waiting for the servers' end of the streams (a round trip): generate() returns
        its tokens at once. Later steps on this session fail as on a closed session."""
        # The close cancels the session's spot checks first thing, on the loop (tasks are not thread-safe).
        if not self.model._loop.close_later(self._session.close()):
            self.close()

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig
    base_model_prefix = "client_model"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _supports_sdpa = True  # attention runs on the servers; this only keeps transformers' init check quiet

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        checkpoint,
        client_parts,
        dht,
        view: SwarmView,
        loop: _LoopThread,
        client_config: ClientConfig,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
        local_edges: LocalEdges | None = None,
    ):
        super().__init__(config)
        self.local_edges = local_edges  # blocks this client runs itself at each end (local_edges.py)
        self.checkpoint, self.client_parts, self.dht = checkpoint, client_parts, dht
        self.view, self._loop, self.client_config = view, loop, client_config
        self.client_model: nn.Module = client_parts.model  # embeddings, final norm, head (registered: .to() works)
        self.family = client_parts.family
        self.active_adapter = active_adapter or None
        self.tuning_mode = tuning_mode
        self.prompt_tuning = (
            PromptTuning(int(config.hidden_size), checkpoint.num_blocks, pre_seq_len, deep=tuning_mode == "deep_ptune")
            if tuning_mode
            else None
        )
        if self.prompt_tuning is not None:
            self.client_model.requires_grad_(False)  # as in Petals: only the prompts train by default
        self.blocks = RemoteBlocks(view, self.active_adapter)
        self._tokenizer = None
        with contextlib.suppress(Exception):
            path = checkpoint.resolver.local_path("generation_config.json")
            if path is not None:
                self.generation_config = GenerationConfig.from_pretrained(str(path.parent))

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
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        active_adapter: str | None = None,
        privacy: Privacy | list[str] | dict | str | None = None,
        **config_overrides: Any,
    ) -> DistributedModelForCausalLM:
        """`privacy`: who may receive this client's hidden states, for every call (privacy.py): None or
        "any", `Privacy.members(ids)` / `.only(ids)` / `.local(ids)`, or a list of peer ids (only these)."""
        privacy = as_privacy(privacy)  # a bad peer list fails here, before anything starts
        if tuning_mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {tuning_mode!r}")
        if tuning_mode and (type(pre_seq_len) is not int or pre_seq_len < 1):
            raise ValueError(f"tuning_mode={tuning_mode!r} needs pre_seq_len >= 1, got {pre_seq_len!r}")
        config = client_config or ClientConfig()
        for key, value in config_overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown client option {key!r}")
            setattr(config, key, value)
        if not initial_peers:
            raise ValueError("initial_peers is empty: give the multiaddrs of at least one peer of the swarm")
        checkpoint = open_checkpoint(model_name_or_path, token=token, revision=revision)
        prefix = resolve_dht_prefix(checkpoint, dht_prefix or config.dht_prefix)
        edge_blocks = check_edge_blocks(config.local_edge_blocks, checkpoint.num_blocks)
        if edge_blocks and active_adapter:
            raise LocalEdgesError("local edge blocks run without adapters: use local_edge_blocks=0 with an adapter")
        options = LoadOptions(device=device, dtype=torch_dtype, token=token, revision=revision)
        client_parts = load_client_parts(checkpoint, options)
        local_edges = LocalEdges.load(checkpoint, edge_blocks, options) if edge_blocks else None
        dht = start_dht(
            initial_peers,
            client_mode=True,
            host_maddrs=config.host_maddrs,
            use_relay=config.use_relay,
            auto_nat=config.auto_nat,
            in_process=True,  # no forked copy of a process holding torch and the client's weights
        )
        loop = _LoopThread()
        try:
            p2p = loop.run(dht.replicate_p2p(), timeout=60)
            view = SwarmView(dht, p2p, prefix, checkpoint.num_blocks, config, privacy=privacy)
            return cls(
                checkpoint.config,
                checkpoint=checkpoint,
                client_parts=client_parts,
                dht=dht,
                view=view,
                loop=loop,
                client_config=config,
                tuning_mode=tuning_mode,
                pre_seq_len=pre_seq_len,
                active_adapter=active_adapter,
                local_edges=local_edges,
            ).to(client_parts.device)
        except BaseException:
            loop.stop()
            dht.shutdown()
            raise

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

    @property
    def privacy(self) -> Privacy:
        """Who may receive this client's hidden states (from_pretrained's `privacy`)."""
        return self.view.privacy

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.prompt_tuning is None else self.prompt_tuning.pre_seq_len

    def route(self, max_length: int | None = None) -> str:
        """A readable description of the route a new session would take now."""
        self._loop.run(self.view.refresh())
        from corolla.swarm.client.routing import describe_route

        start, end = self.local_edges.remote_range if self.local_edges is not None else (0, self.view.num_blocks)
        route = describe_route(self.view.route(start, end, max_length, adapter=self.active_adapter))
        return route if self.local_edges is None else f"{route}; {self.local_edges.describe()}"

    def inference_session(
        self, max_length: int, batch_size: int = 1, privacy: Privacy | list[str] | dict | str | None = None
    ) -> RemoteSession:
        """A session for up to `max_length` tokens (prompt-tuning prefixes are added on top); `privacy`
        narrows who may receive its hidden states (default: the model's own policy)."""
        privacy = as_privacy(privacy) if privacy is not None else None
        prompts = None
        if self.prompt_tuning is not None and self.prompt_tuning.deep:
            with torch.no_grad():
                prompts = self.prompt_tuning.deep_prompts(batch_size)
        return RemoteSession(self, max_length + self.pre_seq_len, prompts, privacy)

    def close(self) -> None:
        self._loop.wait_background()  # sessions generate() left closing: the servers free them now
        with contextlib.suppress(Exception):
            self._loop.run(self.view.p2p.shutdown(), timeout=10)
        self._loop.stop()
        self.dht.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def device(self) -> torch.device:
        # transformers walks every parameter to answer this, several times per generated token.
        return self.client_parts.device

    def get_input_embeddings(self) -> nn.Module:
        return self.client_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self.client_model, "lm_head", None)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache lives on the servers: generate() gets a SwarmCache instead

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

    # --- model ------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SwarmCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: SwarmCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the causal-LM loss with `labels`) for `input_ids` [batch, length].

        Without a cache this is one stateless pass through the swarm, differentiable (training); with
        a SwarmCache (what generate() passes) the tokens go through its inference session. Positions
        follow the servers' caches and, for padded batches, the attention mask: `position_ids` are
        accepted for transformers' sake and not sent.
        """
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.family.embed(self.client_model, input_ids.to(self.device))
        if isinstance(cache, SwarmCache):
            hidden = self._step_session(cache, inputs_embeds, attention_mask)
        else:
            hidden = self._stateless(inputs_embeds, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.family.head(self.client_model, hidden)
        if labels is None and isinstance(cache, SwarmCache):
            return step_output(logits, cache)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits.float(), labels.to(logits.device), vocab_size=logits.shape[-1])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _prefix(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepend the trainable prompt embeddings (ptune) to a sequence that starts at position 0."""
        if self.prompt_tuning is None:
            return hidden, mask
        batch = hidden.shape[0]
        prompts = self.prompt_tuning.input_prompts(batch).to(dtype=hidden.dtype, device=hidden.device)
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, self.pre_seq_len), mask], dim=1)
        return torch.cat([prompts, hidden], dim=1), mask

    def _stateless(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # Prompt tuning with frozen embeddings: only the prompts' positions need input gradients.
        grad_prefix = self.pre_seq_len if self.pre_seq_len and not hidden.requires_grad else None
        hidden, mask = self._prefix(hidden, mask)
        send_mask = None
        if mask is not None:
            if tuple(mask.shape) != tuple(hidden.shape[:2]):
                raise ValueError(
                    f"attention_mask must be [batch, length] = {list(hidden.shape[:2])}, got {list(mask.shape)}"
                )
            if bool((mask == 0).any()):
                send_mask = mask.to(torch.int64).cpu()
        deep = None
        if self.prompt_tuning is not None and self.prompt_tuning.deep:
            deep = self.prompt_tuning.deep_prompts(hidden.shape[0])
        edges = self.local_edges
        if edges is None:
            out = remote_blocks(self.blocks, hidden.cpu(), deep, send_mask, self._loop.run, grad_prefix)
            return out.to(hidden.device)[:, self.pre_seq_len :]
        # Blocks [0, k) and [L - k, L) run here, differentiably; the swarm gets [k, L - k). Every position
        # of the edges' outputs depends on the prompts, so no grad_prefix shortcut.
        grad = torch.is_grad_enabled()
        local_mask = None if send_mask is None else send_mask.to(hidden.device)
        hidden = edges.run(edges.head, hidden, local_mask, deep, grad)
        out = remote_blocks(self.blocks, hidden.cpu(), deep, send_mask, self._loop.run, None, edges.remote_range)
        out = edges.run(edges.tail, out.to(hidden.device), local_mask, deep, grad)
        return out[:, self.pre_seq_len :]

    def _step_session(self, cache: SwarmCache, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        session = cache.session
        received = hidden.shape[1]
        first = session.position == 0
        if first:
            hidden, mask = self._prefix(hidden, mask)
        elif mask is not None and self.pre_seq_len:
            mask = torch.cat([mask.new_ones(mask.shape[0], self.pre_seq_len), mask], dim=1)
        pending = session.pending if cache.seen == 0 else None
        if pending is not None:  # the previous turn's last token was never sent: it goes first
            hidden = torch.cat([self.family.embed(self.client_model, pending.to(self.device)), hidden], dim=1)
        if mask is not None:
            # Without padding, positions follow the servers' caches (also across turns): send no mask.
            mask = mask.to(torch.int64) if bool((mask == 0).any()) else None
        with torch.no_grad():
            out = session.step(hidden.detach().cpu(), hypo_ids=cache.take_hypo_ids(), attention_mask=mask)
        session.pending = None
        cache.seen += received
        out = out.to(hidden.device, hidden.dtype)
        return out[:, self.pre_seq_len :] if first else out

    # --- generation -------------------------------------------------------------------------------
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        seed: int | None = None,
        session: RemoteSession | None = None,
        should_stop: Callable[[], bool] | None = None,
        streamer: Any = None,
        stopping_criteria: Any = None,
        privacy: Privacy | list[str] | dict | str | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' generate() over a swarm inference session; every strategy and argument works.

        Corolla's additions: `seed` (sampling as a local generate() seeded the same way), `session=`
        (continue a multi-turn RemoteSession: its cache is reused, the previous turn's last token is
        sent first), `should_stop()` (polled after every token), `streamer` may also be a plain
        callable `fn(tokens [batch]) -> bool` (True stops), `stop_strings` without a tokenizer (the
        model's own), `eos_token_id=[]` for no end-of-sequence token, and `privacy` (who may receive
        this call's hidden states; see from_pretrained; a `session=` keeps the privacy it was opened with).
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be [batch, length] with length >= 1")
        _check_sampling(kwargs)
        if isinstance(kwargs.get("eos_token_id"), list) and not kwargs["eos_token_id"]:
            kwargs["eos_token_id"] = None  # Corolla's spelling of "no end-of-sequence token"
        if kwargs.get("attention_mask") is None:
            # No mask given means no padding. Left to itself, transformers would infer a mask from pad
            # tokens in the prompt, and where pad is also a chat-template token (SmolLM2: <|im_end|>) it
            # masks real tokens out: different text, and a "padded" batch that stock servers refuse.
            # Also on a session's later turns, where that inferred mask (this turn's tokens only) failed
            # the step's [batch, past + length] check: a chat's second message never got an answer.
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        if kwargs.get("stop_strings") and "tokenizer" not in kwargs:
            kwargs["tokenizer"] = self.tokenizer
        criteria = list(stopping_criteria or [])
        callback, token_callback = streamer, None
        if streamer is not None and not hasattr(streamer, "put"):
            token_callback = TokenCallbackStopping(streamer, input_ids.shape[1])
            criteria.append(token_callback)
            streamer = None
        if should_stop is not None:
            criteria.append(CallbackStopping(lambda ids: should_stop()))
        beams = int(kwargs.get("num_beams") or (generation_config or self.generation_config).num_beams or 1)
        own_session = session is None
        if own_session:
            total = generation_length(input_ids.shape[1], generation_config or self.generation_config, kwargs)
            rows = input_ids.shape[0] * max(beams, int(kwargs.get("num_return_sequences") or 1))
            session = self.inference_session(max_length=total, batch_size=rows, privacy=privacy)
        elif privacy is not None and as_privacy(privacy) != session.privacy:
            raise ValueError(f"this session was opened with privacy '{session.privacy}'; open another for another")
        elif beams > 1:
            raise ValueError("beam search needs its own session: call generate() without session=")
        if session.pending is not None and session.pending.shape[0] != input_ids.shape[0]:
            raise ValueError("the session's pending tokens are for another batch size")
        start_position, start_pending = session.position, session.pending
        if "prompt_lookup_num_tokens" not in kwargs:
            draft = speculative.default_speculation(
                kwargs,
                generation_config or self.generation_config,
                input_ids.shape[0],
                self.client_config.speculative,
                custom_stopping=bool(stopping_criteria),
            )
            if draft is not None and route_choice.speculation_pays(
                _trip_s(session), session.speculated, input_ids
            ):  # only where it pays on this route and text (route_choice.py)
                kwargs["prompt_lookup_num_tokens"] = draft
        self.speculation = None
        try:
            for restart in range(MAX_LIAR_RESTARTS + 1):
                rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
                try:
                    with rng, torch.inference_mode(), self._loop.borrowed():
                        if seed is not None:
                            torch.manual_seed(seed)
                        out = super().generate(
                            input_ids,
                            generation_config,
                            stopping_criteria=criteria or None,
                            streamer=streamer,
                            cache=SwarmCache(session),
                            **kwargs,
                        )
                        # Checks still in flight decide whether these tokens stand (bounded wait).
                        steptrace.mark("settle")
                        self._loop.run(session._session.verifier.settle())
                        steptrace.mark("settled")
                    break
                except LiarCaught as caught:
                    if restart == MAX_LIAR_RESTARTS:
                        raise
                    # Re-route around the liar and re-run from where this call started: the tokens
                    # returned are then the ones honest servers give (seeded sampling repeats too).
                    logger.warning("%s; re-running the generation on honest servers", caught)
                    self._loop.run(restart_route(session._session, start_position))
                    session.pending = start_pending
                    if token_callback is not None:
                        token_callback.rewind()  # the re-run's tokens are new to the callback again
                    if callable(getattr(callback, "rewind", None)):
                        callback.rewind()  # e.g. ReplyWatcher: the re-run's tokens replace this run's
            if self.speculation is not None:  # what this session's drafts achieved: its next turn's choice
                session.speculated.steps += self.speculation.stats.steps
                session.speculated.drafted += self.speculation.stats.drafted
                session.speculated.accepted += self.speculation.stats.accepted
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            if not own_session and sequences.shape[1] > input_ids.shape[1]:
                session.pending = sequences[:, -1:]  # generated but never sent: the next turn sends it first
            return out
        finally:
            self.last_recipients = session.recipients  # who received this call's hidden states
            if own_session:
                session.close_in_background()

    # transformers' decoding loops call these two once per step. Their generic versions serve every
    # architecture (clones for compiled graphs, position ids, 4D masks, a mask grown by a column per
    # token); a swarm step needs only the new tokens, the SwarmCache and, for padded batches, the mask.
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The new tokens and the SwarmCache (plus the mask while it is needed); anything else, such as
        a generation started from `inputs_embeds`, goes through transformers' generic version."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if not isinstance(cache, SwarmCache) or inputs_embeds is not None:
            return super().prepare_inputs_for_generation(
                input_ids,
                next_sequence_length=next_sequence_length,
                cache=cache,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                is_first_iteration=is_first_iteration,
                **kwargs,
            )
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        inputs = {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask}
        for key, value in kwargs.items():
            if key not in _NOT_FORWARDED:
                inputs[key] = value
        return inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: Any,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        """With a SwarmCache, positions follow the servers' caches: the position ids generate() derives
        from the mask are dropped (never sent), and so is the mask of an unpadded batch (it would only be
        checked for zeros and left unsent); a padded batch's mask grows as usual."""
        cache = model_kwargs.get("cache")
        if isinstance(cache, SwarmCache) and model_kwargs.get("token_type_ids") is None:
            model_kwargs["position_ids"] = None
            mask = model_kwargs.get("attention_mask")
            if mask is not None and cache.needs_mask:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], num_new_tokens))], dim=-1)
            else:
                mask = None
            model_kwargs["attention_mask"] = mask
            return model_kwargs
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )

    def _get_candidate_generator(self, generation_config, *args, logits_processor=None, **kwargs):
        """Prompt lookup drafts with an adaptive length (speculative.py); other assistants as transformers does."""
        if generation_config.prompt_lookup_num_tokens is None or generation_config.assistant_early_exit is not None:
            return super()._get_candidate_generator(
                generation_config, *args, logits_processor=logits_processor, **kwargs
            )
        cache = kwargs.get("model_kwargs", {}).get("cache")
        room = None
        if isinstance(cache, SwarmCache):

            def room(sequence_length: int, cache=cache) -> int:
                """Draft tokens that still fit in the session, after this step's undrafted tokens."""
                session = cache.session
                if not session.supports_rollback:  # stock Petals 2.2 servers ignore start_from_position
                    return 0
                pending = session.pending.shape[1] if cache.seen == 0 and session.pending is not None else 0
                undrafted = sequence_length - cache.seen + pending + (self.pre_seq_len if session.position == 0 else 0)
                # One position stays free for the model's own token after the draft.
                return session.max_length - session.position - undrafted - 1

        self.speculation = speculative.AdaptivePromptLookup(
            room=room,
            max_tokens=generation_config.prompt_lookup_num_tokens,
            eos_token_id=generation_config._eos_token_tensor,
            max_matching_ngram_size=generation_config.max_matching_ngram_size or speculative.MAX_NGRAM,
            max_length=generation_config.max_length,
            logits_processor=logits_processor,
            vocab_size=self.config.get_text_config().vocab_size,
        )
        return self.speculation


def _trip_s(session: RemoteSession) -> float | None:
    """A step's network time through the session's route (or the one it would take); None if unknown."""
    inner = session._session
    view = inner.view
    route = inner.route
    if not route and view.spans:
        with contextlib.suppress(Exception):
            route = view.route(0, view.num_blocks)
    peers = [segment.peer_id for segment in route]
    return route_choice.route_trip_s(peers, route_choice.link_rtts(view, peers)) if route else None


def step_output(logits: torch.Tensor, cache: SwarmCache) -> CausalLMOutputWithPast:
    """`CausalLMOutputWithPast(logits=logits, cache=cache)`, filled in directly: a decoding step builds
    one per token, and the dataclass route (field lookups and checks per attribute) costs ~20 us of
    the ~100 us a token costs the client. The same object: the fields are items and attributes, the
    rest None (tests/test_hf_api.py compares the two)."""
    out = CausalLMOutputWithPast.__new__(CausalLMOutputWithPast)
    OrderedDict.__setitem__(out, "logits", logits)
    OrderedDict.__setitem__(out, "cache", cache)
    vars(out).update(_NO_OUTPUTS, logits=logits, cache=cache)
    return out


_NO_OUTPUTS = dict.fromkeys(field.name for field in dataclasses.fields(CausalLMOutputWithPast))


def _check_sampling(kwargs: dict) -> None:
    """Clear errors for settings transformers would ignore without sampling (e.g. top_p=1.5)."""
    temperature, top_p = kwargs.get("temperature"), kwargs.get("top_p")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (for greedy decoding use do_sample=False)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    top_k, penalty = kwargs.get("top_k"), kwargs.get("repetition_penalty")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if penalty is not None and not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")


class AutoDistributedModelForCausalLM(DistributedModelForCausalLM):
    """The Petals name: `AutoDistributedModelForCausalLM.from_pretrained(...)`."""
