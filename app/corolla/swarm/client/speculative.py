"""Speculative steps through the swarm, drafted by prompt lookup (no second model).

transformers' assisted generation does the verification: it drafts k tokens by finding the last
n-gram of the conversation earlier in it (`prompt_lookup_num_tokens`), sends them with the last
token as one multi-token step, keeps the longest prefix the model agrees with plus the model's own
next token, and crops the cache past the rest (SwarmCache.crop: the servers roll back with
`start_from_position` at the next step). Greedy output is the non-speculative output token for
token; with sampling each position is sampled from the model's own distribution and a draft token
is kept only when it equals that sample, so the distribution is unchanged (the random stream is
consumed differently, so a seeded run picks other tokens than a seeded plain run).

On a swarm a step costs about one trip through the chain whatever its length, so every accepted
draft token saves a trip. k adapts like transformers' assistant heuristic (+2 after a fully accepted
draft, -1 otherwise), and drafting pauses for a while when recent acceptance is low (a long draft
still costs each server compute). A failed draft is not free on any route (the longer step, the
rollback, and transformers' assisted loop costing more per step than its plain one): after a pause
one draft probes again, and while probes keep failing each pause is twice as long as the last (up to
MAX_PAUSE_STEPS), so text that never repeats itself costs a handful of drafts; a good draft resets it.
A draft also needs a match of at least MIN_NGRAM tokens (transformers falls back to a single token,
whose continuation is rarely the model's: in free text most of those drafts failed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

DEFAULT_DRAFT_TOKENS = 8  # the most draft tokens per step when speculation is on by default
MAX_DRAFT_TOKENS = 32
MAX_NGRAM = 3
MIN_NGRAM = 2  # a draft needs the last MIN_NGRAM tokens seen before: one repeated token predicts little
MIN_ACCEPTANCE = 0.2  # below this (moving average of accepted / drafted), drafting pauses
PAUSE_STEPS = 8  # the first pause; each pause after a failed probe doubles it
MAX_PAUSE_STEPS = 64
GOOD_DRAFT = 0.5  # a draft at least this well accepted ends the backoff


@dataclass
class SpeculationStats:
    steps: int = 0  # verification steps that carried a draft
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class AdaptivePromptLookup(PromptLookupCandidateGenerator):
    """Prompt-lookup drafting with an adaptive draft length and a pause when drafts keep failing."""

    def __init__(self, *, max_tokens: int, room=None, **kwargs):
        self.max_tokens = max(1, min(int(max_tokens), MAX_DRAFT_TOKENS))
        self.room = room  # room(sequence_length) -> the most draft tokens the session can still take
        super().__init__(num_output_tokens=min(4, self.max_tokens), **kwargs)
        self.stats = SpeculationStats()
        self._recent = 0.5
        self._paused = 0
        self._pause_steps = PAUSE_STEPS  # the next pause's length
        self._drafted_now = 0
        self._ngrams = NgramIndex(MIN_NGRAM)

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, torch.Tensor | None]:
        if self._paused > 0:
            self._paused -= 1
            self._drafted_now = 0
            return input_ids, None
        if not self._ngrams.seen_before(input_ids[0]):
            self._drafted_now = 0
            return input_ids, None
        candidates, logits = super().get_candidates(input_ids, **kwargs)
        if self.room is not None:
            room = max(0, self.room(input_ids.shape[1]))
            candidates = candidates[:, : input_ids.shape[1] + room]
        self._drafted_now = candidates.shape[1] - input_ids.shape[1]
        return candidates, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        drafted = self._drafted_now
        if drafted <= 0:
            return
        accepted = int(num_matches)
        self.stats.steps += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self._recent = 0.7 * self._recent + 0.3 * (accepted / drafted)
        if accepted == drafted:
            self.num_output_tokens = min(self.num_output_tokens + 2, self.max_tokens)
        else:
            self.num_output_tokens = max(1, self.num_output_tokens - 1)
        if accepted >= GOOD_DRAFT * drafted:
            self._pause_steps = PAUSE_STEPS
        if self._recent < MIN_ACCEPTANCE:
            self._paused = self._pause_steps
            self._pause_steps = min(2 * self._pause_steps, MAX_PAUSE_STEPS)
            # The probe after the pause decides alone: a miss pauses again, any acceptance goes on.
            self._recent = MIN_ACCEPTANCE


class NgramIndex:
    """The n-grams of one growing sequence, indexed as it grows: asked once per decoding step whether
    the last n tokens occurred before, it looks only at the new tokens (a scan of the whole sequence
    per step costs several tensor operations a token)."""

    def __init__(self, n: int):
        self.n = n
        self.tokens: list[int] = []
        self.grams: set[tuple[int, ...]] = set()  # every n-gram that ends before the last known token

    def seen_before(self, sequence: torch.Tensor) -> bool:
        """Whether the last `n` tokens of `sequence` (1-D) occur earlier in it, with at least one token
        after them. Within a generate() call a sequence only grows; anything else starts a new index."""
        length = sequence.shape[0]
        if length < len(self.tokens):
            self.tokens, self.grams = [], set()
        tokens = self.tokens
        n = self.n
        for token in sequence[len(tokens) :].tolist():
            if len(tokens) >= n:
                self.grams.add(tuple(tokens[-n:]))  # it now has a token after it
            tokens.append(token)
        return len(tokens) > n and tuple(tokens[-n:]) in self.grams


def default_speculation(
    kwargs: dict, generation_config, rows: int, enabled: bool, custom_stopping: bool = False
) -> int | None:
    """How many draft tokens to use when the caller did not choose: on for greedy decoding of one
    sequence (exactly the same tokens, fewer trips); off for sampling (same distribution, but a
    seeded run would no longer equal a seeded plain run), beams, batches, an assistant model, and
    the caller's own stopping criteria (transformers asks them only after a whole speculative step,
    so one that would stop in the middle of it sees the step's later tokens too)."""
    if not enabled or rows != 1 or custom_stopping or kwargs.get("assistant_model") is not None:
        return None
    if int(kwargs.get("num_beams") or generation_config.num_beams or 1) != 1:
        return None
    if int(kwargs.get("num_return_sequences") or 1) != 1:
        return None
    do_sample = kwargs.get("do_sample", generation_config.do_sample)
    if do_sample:
        return None
    return DEFAULT_DRAFT_TOKENS
