"""One OpenAI-style completion through a swarm client (node/openai_api.py): a prompt (text, or chat messages
put through the model's chat template) generated once, no session kept. Run by the block server's engine
while the node contributes, else by the node's own client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class EmptyPrompt(ValueError):
    """A prompt with no tokens (nothing to generate from)."""


def prompt_ids(tokenizer: Any, messages: list[dict] | None = None, prompt: str | None = None) -> list[int]:
    """The prompt's token ids: `messages` ({role, content}) through the chat template (a plain transcript
    without one), else `prompt` as text."""
    if messages is not None:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False).input_ids
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer(text).input_ids
    ids = tokenizer(prompt or "").input_ids
    if not ids:
        raise EmptyPrompt("the prompt is empty after tokenisation")
    return ids


def complete(
    model: Any,
    ids: list[int],
    *,
    max_new_tokens: int,
    stops: list[str],
    sampling: dict,
    privacy: Any,
    on_text: Callable[[str], None],
    should_stop: Callable[[], bool],
) -> tuple[str, int, str, list]:
    """(text, tokens generated, finish reason "stop" or "length", who saw the hidden states)."""
    import torch

    from corolla.swarm.client.chat import ReplyWatcher, seen_by

    watcher = ReplyWatcher(model.tokenizer, model.eos_token_ids, stops, on_text, should_stop)
    session = model.inference_session(max_length=len(ids) + max_new_tokens, privacy=privacy)
    try:
        model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            eos_token_id=[],
            streamer=watcher,
            session=session,
            **sampling,
        )
        recipients = seen_by(session)
    finally:
        session.close_in_background()  # the reply need not wait for the servers' goodbyes
    finish = "stop" if watcher.stopped_by in ("eos", "stop string") else "length"
    return watcher.text(), len(watcher.stream.tokens), finish, recipients
