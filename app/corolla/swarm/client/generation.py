"""Choosing the next token: greedy or sampled, with transformers' own public logits processors.

The processors run in the order `generate()` uses (repetition penalty, then temperature, top-k,
top-p), softmax in float32, then `torch.multinomial` on the global generator, so a seeded swarm
generation picks the same tokens as a local `generate()` seeded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteria


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self

    def processors(self) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k is not None:
                processors.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.top_p))
        return processors


def sampling_kwargs(
    temperature: float,
    top_p: float = 1.0,
    top_k: int | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> dict:
    """`generate()` keywords from user-facing settings, where a temperature of 0 means greedy."""
    kwargs = {
        "do_sample": temperature > 0,
        "temperature": temperature or 1.0,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
    }
    if temperature > 0:  # greedy has no top-k: passed, transformers warns on every reply that it is ignored
        kwargs["top_k"] = top_k or 0  # 0, not None: transformers' default would be 50
    return kwargs


def next_tokens(
    logits: torch.Tensor, sequences: torch.Tensor, params: SamplingParams, processors: LogitsProcessorList
) -> torch.Tensor:
    """[batch, vocab] logits of the last position -> [batch] token ids."""
    scores = processors(sequences, logits.to(torch.float32))
    if not params.do_sample:
        return scores.argmax(dim=-1)
    probs = torch.nn.functional.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


class StopChecker:
    """End of generation: an end-of-sequence token, or a stop string in the decoded continuation."""

    def __init__(self, eos_token_ids: list[int], stop_strings: list[str] | None = None, tokenizer=None):
        if stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.eos = set(eos_token_ids)
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.tokenizer = tokenizer

    def is_eos(self, token: int) -> bool:
        return token in self.eos

    def stop_string_hit(self, new_tokens: list[int]) -> bool:
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)


class SwarmCache:
    """What transformers' generate() holds as its cache: the keys and values live on the servers of
    an inference session, so this only counts the tokens sent and carries beam reorderings, which
    go to the servers as `hypo_ids` with the next step."""

    is_compileable = False
    is_croppable = True  # speculative steps: a rejected draft is rolled back on the servers
    is_linear = (False,)

    def __init__(self, session):
        self.session = session  # a RemoteSession
        self.seen = 0  # tokens of this generate() call's sequence that the servers hold
        self._hypo_ids: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def needs_mask(self) -> bool:
        """Whether steps still need generate()'s attention mask: until this call's first step has gone
        out (it tells the session whether the batch is padded), and for a padded batch. Unpadded, the
        servers' caches give every position, and the mask is dropped (no per-token growth)."""
        return self.seen == 0 or self.session.padded

    def activate_past_recording(self) -> None:
        """transformers asks for this before speculative steps; the servers keep every position anyway."""

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (rejected draft tokens); the servers roll back
        (start_from_position) with the next step."""
        if tokens_to_remove > 0:
            raise ValueError("SwarmCache.crop takes a negative number of tokens to remove")
        remove = -int(tokens_to_remove)
        if remove == 0:
            return
        if remove > self.seen:
            raise ValueError(f"cannot remove {remove} tokens: this generation sent {self.seen}")
        self.session.rollback(self.session.position - remove)
        self.seen -= remove

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.to("cpu", torch.int64)
        if self._hypo_ids is not None:
            beam_idx = self._hypo_ids[beam_idx]
        self._hypo_ids = beam_idx

    def take_hypo_ids(self) -> torch.Tensor | None:
        """The reordering to send with the next step (None when the rows stay in place)."""
        hypo_ids, self._hypo_ids = self._hypo_ids, None
        if hypo_ids is not None and torch.equal(hypo_ids, torch.arange(len(hypo_ids))):
            return None
        return hypo_ids


class CallbackStopping(StoppingCriteria):
    """A stopping criterion from a callable `fn(input_ids) -> bool` (True: stop every row)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs) -> torch.Tensor:
        stop = bool(self.fn(input_ids))
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TokenCallbackStopping(StoppingCriteria):
    """Calls `fn(tokens [batch]) -> bool` once per new token, also when a speculative step added several
    at once; True stops every row (the tokens after it are not shown to `fn`)."""

    def __init__(self, fn, prompt_length: int | None = None):
        self.fn = fn
        self._prompt_length = prompt_length
        self._length = prompt_length  # None: only the last token of the first call is new

    def rewind(self) -> None:
        """The generation starts again from its prompt (a re-run after a liar was caught)."""
        self._length = self._prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None = None, **kwargs) -> torch.Tensor:
        length = input_ids.shape[1]
        first = length - 1 if self._length is None else self._length
        self._length = length
        stop = False
        for column in range(max(first, 0), length):
            if self.fn(input_ids[:, column]):
                stop = True
                break
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def generation_length(prompt_length: int, config: GenerationConfig, kwargs: dict) -> int:
    """The most tokens a generate() call can put in a session: prompt plus new tokens."""
    max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if max_new is not None:
        return prompt_length + int(max_new)
    max_length = kwargs.get("max_length", config.max_length)
    return max(int(max_length if max_length is not None else 20), prompt_length)
