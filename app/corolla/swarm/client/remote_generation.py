"""generate() for the distributed model: transformers' decoding loops fed from a swarm inference session
(SwarmCache), with Corolla's additions (seeded sampling, multi-turn sessions, stop callbacks, speculative
drafts where they pay, a re-run on honest servers after a caught liar). Kept apart from the model
itself as Petals keeps remote_generation.py apart from its model classes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.swarm import steptrace
from corolla.swarm.client import route_choice, speculative
from corolla.swarm.client.generation import CallbackStopping, SwarmCache, TokenCallbackStopping, generation_length
from corolla.swarm.client.privacy import Privacy, as_privacy
from corolla.swarm.client.remote_session import RemoteSession
from corolla.swarm.client.verification import LiarCaught

logger = logging.getLogger(__name__)
# generate()'s per-step keywords that a swarm step has no use for (positions follow the servers' caches).
_NOT_FORWARDED = frozenset({"labels", "next_sequence_length", "position_ids", "token_type_ids", "past_key_values"})
MAX_LIAR_RESTARTS = 3  # a generation re-runs at most this often after servers caught lying


class RemoteGenerationMixin(GenerationMixin):
    """generate() and transformers' per-step hooks for DistributedModelForCausalLM (remote_model.py):
    uses its inference_session(), _loop, client_config, generation_config, tokenizer and pre_seq_len."""

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
                    self._loop.run(session._session.restart(start_position))
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
            route = view.route(inner.start, inner.end)
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
