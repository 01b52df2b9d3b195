"""What a streamed reply costs per token outside the swarm, before and after issue 31, in one run.
Prints JSON.

- detokenising: `TextStream.push` (a short window per token) against the old way (the whole reply
  decoded again on every token), with the same tokenizer and tokens; the pieces must be identical;
- writing: the node's database with each piece appended (`append_to_message`) against the whole reply
  rewritten on every token (`update_message`), for replies of 500 and 2,000 tokens.

The tokenizer is the tiny models' byte-level BPE unless `--tokenizer FOLDER` names a real one (e.g. the
converted SmolLM2 in Corolla's cache). Note the load average printed with the figures: the machine may be
shared.

Usage: python benchmarks/reply_write_path.py [--tokenizer FOLDER] [--tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from corolla.node.db import Database
from corolla.swarm.client.chat import TextStream

TEXT = (
    "Hello world. The capital of France is Paris! Here is a list:\n- naïve café 😀\n- 日本語 🌸\n\n"
    "```python\nfor i in range(10):\n    print(i)\n```\n"
)


class WholeDecode:
    """The old TextStream: the whole reply decoded again on every token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece


def detokenising(tokenizer, tokens: list[int]) -> dict:
    result = {}
    pieces = {}
    for name, cls in (("whole_decode", WholeDecode), ("incremental", TextStream)):
        stream = cls(tokenizer)
        started = time.perf_counter()
        pieces[name] = [stream.push(token) for token in tokens]
        result[f"{name}_ms_per_token"] = round((time.perf_counter() - started) / len(tokens) * 1000, 4)
    result["identical_pieces"] = pieces["whole_decode"] == pieces["incremental"]
    result["speedup"] = round(result["whole_decode_ms_per_token"] / max(result["incremental_ms_per_token"], 1e-9), 1)
    return result


def _write(name: str, n: int, piece: str) -> float:
    with tempfile.TemporaryDirectory() as folder:
        db = Database(Path(folder) / "chats.db")
        chat = db.create_chat("benchmark", None, None)
        reply = db.add_message(chat["id"], "assistant", "", status="streaming")
        written: list[str] = []
        started = time.perf_counter()
        for _ in range(n):
            written.append(piece)
            if name == "rewrite":
                db.update_message(reply["id"], "".join(written), len(written), "streaming")
            else:
                db.append_to_message(reply["id"], piece, len(written))
        seconds = time.perf_counter() - started
        assert db.messages(chat["id"])[0]["content"] == piece * n
        db.close()
    return seconds / n * 1000


def writing(n: int, rounds: int, piece: str = " token") -> dict:
    """Median over `rounds`, the two ways alternating (a busy machine slows both alike)."""
    times: dict[str, list[float]] = {"rewrite": [], "append": []}
    for _ in range(rounds):
        for name in times:
            times[name].append(_write(name, n, piece))
    return {f"{name}_ms_per_token": round(statistics.median(values), 4) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="a model folder with a tokenizer (default: the tiny one)")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="database runs per way (the median is shown)")
    args = parser.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from corolla.swarm.models.tiny import build_tokenizer

        tokenizer = build_tokenizer()
    ids = tokenizer(TEXT * (args.tokens // 20 + 1), add_special_tokens=False).input_ids[: args.tokens]
    report = {
        "load_average_1m": round(os.getloadavg()[0], 2),
        "tokenizer": args.tokenizer or "tiny byte-level BPE",
        "tokens": len(ids),
        "detokenising": detokenising(tokenizer, ids),
        "writing_500": writing(500, args.rounds),
        f"writing_{args.tokens}": writing(args.tokens, args.rounds),
        f"writing_{args.tokens * 4}": writing(args.tokens * 4, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
