"""What transformers' own `generate()` needs to run over the swarm: the user's sampling settings as
its keywords, a cache that stands for the servers' caches, stopping criteria that call back per token,
and the length a call can reach. Sampling itself is transformers' (its logits processors, in its order).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.stopping_criteria import StoppingCriteria


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
