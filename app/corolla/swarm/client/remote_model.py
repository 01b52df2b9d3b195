"""A transformers model whose decoder blocks run in the swarm: the Python API, named as in Petals.

    from corolla import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained("repo/or/folder", initial_peers=[...])
    model.generate(input_ids, max_new_tokens=32)          # transformers' own generate()
    model(input_ids, attention_mask=mask, labels=labels).loss.backward()  # through rpc_forward/backward

It is a `PreTrainedModel` + `GenerationMixin`: the client holds the client-side parts (embeddings,
final norm, head) and, with `tuning_mode="ptune"`/`"deep_ptune"`, trainable prompts. `generate()`
feeds transformers' decoding loop from a swarm inference session (SwarmCache); training calls run
stateless forward/backward RPCs. hivemind's P2P objects live on one event loop in a background
thread; this class's methods are synchronous. generate() is in remote_generation.py, the
session wrapper in remote_session.py, the loop in client_loop.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.swarm.client.autograd import remote_blocks
from corolla.swarm.client.client_loop import ClientLoop
from corolla.swarm.client.config import ClientConfig
from corolla.swarm.client.generation import SwarmCache
from corolla.swarm.client.local_edges import LocalEdges, LocalEdgesError, check_edge_blocks
from corolla.swarm.client.privacy import Privacy, as_privacy
from corolla.swarm.client.prompts import PromptTuning
from corolla.swarm.client.remote_forward import RemoteBlocks
from corolla.swarm.client.remote_generation import RemoteGenerationMixin, step_output
from corolla.swarm.client.remote_session import RemoteSession
from corolla.swarm.client.routing import SwarmView
from corolla.swarm.local_calls import LocalServer, SharedP2P
from corolla.swarm.local_dht import InProcessDHT
from corolla.swarm.models import LoadOptions, load_client_parts, open_checkpoint, resolve_dht_prefix
from corolla.swarm.peers import start_dht

__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "RemoteSession", "step_output"]
logger = logging.getLogger(__name__)
TUNING_MODES = (None, "ptune", "deep_ptune")


class DistributedModelForCausalLM(PreTrainedModel, RemoteGenerationMixin):
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
        loop: ClientLoop,
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
        self.shares_dht = False  # True: `dht` is another's (a block server's), left running by close()
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
        dht: InProcessDHT | None = None,
        local_server: LocalServer | None = None,
        **config_overrides: Any,
    ) -> DistributedModelForCausalLM:
        """`privacy`: who may receive this client's hidden states, for every call (privacy.py): None or
        "any", `Privacy.members(ids)` / `.only(ids)` / `.local(ids)`, or a list of peer ids (only these).

        `dht`: a DHT already running on a thread of this process (a block server's) to join through instead
        of starting one: the client then speaks through its p2pd (one per computer) and close() leaves both
        running; `initial_peers` may be empty. `local_server`: that server's handlers (local_calls.py),
        which the client then reaches in-process (a peer cannot dial its own peer id)."""
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
        if not initial_peers and dht is None:
            raise ValueError("initial_peers is empty: give the multiaddrs of at least one peer of the swarm")
        checkpoint = open_checkpoint(model_name_or_path, token=token, revision=revision)
        prefix = resolve_dht_prefix(checkpoint, dht_prefix or config.dht_prefix)
        edge_blocks = check_edge_blocks(config.local_edge_blocks, checkpoint.num_blocks)
        if edge_blocks and active_adapter:
            raise LocalEdgesError("local edge blocks run without adapters: use local_edge_blocks=0 with an adapter")
        options = LoadOptions(device=device, dtype=torch_dtype, token=token, revision=revision)
        client_parts = load_client_parts(checkpoint, options)
        local_edges = LocalEdges.load(checkpoint, edge_blocks, options) if edge_blocks else None
        shared = dht is not None
        if not shared:
            dht = start_dht(
                initial_peers,
                client_mode=True,
                host_maddrs=config.host_maddrs,
                use_relay=config.use_relay,
                auto_nat=config.auto_nat,
                in_process=True,  # no forked copy of a process holding torch and the client's weights
            )
        loop = ClientLoop()
        p2p = None
        try:
            # A shared DHT: a P2P client of its p2pd of our own (on our loop), closed with this model.
            p2p = loop.run(dht.new_p2p() if shared else dht.replicate_p2p(), timeout=60)
            if shared:  # its streams end with this client (p2pd stays), the own server's reached in-process
                p2p = SharedP2P(p2p, local_server)
            view = SwarmView(dht, p2p, prefix, checkpoint.num_blocks, config, privacy=privacy)
            model = cls(
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
            model.shares_dht = shared
            return model
        except BaseException:
            if shared and p2p is not None:
                with contextlib.suppress(Exception):
                    loop.run(p2p.shutdown(), timeout=10)
            loop.stop()
            if not shared:
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

    def wait_for_route(self, timeout: float, interval: float = 1.0) -> str:
        """`route()` once the servers' announcements cover the model (a swarm just started may still be
        announcing); after `timeout` seconds, the last reason there was none is raised."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.route()
            except Exception:
                if time.monotonic() + interval > deadline:
                    raise
                time.sleep(interval)

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

    def run_async(self, coroutine, timeout: float | None = None) -> Any:
        """Run a coroutine on this client's event loop (where its P2P objects live) and wait for it."""
        return self._loop.run(coroutine, timeout)

    def close(self) -> None:
        self._loop.wait_background()  # sessions generate() left closing: the servers free them now
        with contextlib.suppress(Exception):
            self._loop.run(self.view.direct_links.close(), timeout=10)
        with contextlib.suppress(Exception):
            self._loop.run(self.view.p2p.shutdown(), timeout=10)
        self._loop.stop()
        if not self.shares_dht:  # a block server's DHT (from_pretrained's `dht`) stays for the server
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


class AutoDistributedModelForCausalLM(DistributedModelForCausalLM):
    """The Petals name: `AutoDistributedModelForCausalLM.from_pretrained(...)`."""
