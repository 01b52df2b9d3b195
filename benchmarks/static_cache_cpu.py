"""Static vs dynamic KV cache on the CPU: the per-step time of a span's decode step, measured in one
run, alternating the two so that load on the machine hits both alike. Prints JSON.

The figures decide `STATIC_CACHE_MIN_MAX_LENGTH` in corolla/swarm/models/static_cache.py: the static
cache is used only where it measured faster. Usage:
    python benchmarks/static_cache_cpu.py [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from corolla.swarm.models import load_span, open_checkpoint
from corolla.swarm.models.static_cache import StaticSessionCache
from corolla.swarm.models.tiny import make_tiny_model


def smollm2_shaped(folder: Path, blocks: int) -> Path:
    """A random-weight model with SmolLM2-135M's block shape (the embedded default model)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from corolla.swarm.models.tiny import _write_shards, build_tokenizer

    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=blocks,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=512,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config.to_json_string())
    _write_shards(model.state_dict(), folder, 1)
    build_tokenizer().save_pretrained(str(folder))
    return folder


def measure(span, cached: int, steps: int, batch: int = 1) -> dict:
    x0 = torch.randn(batch, cached, span.hidden_size)
    x = torch.randn(batch, 1, span.hidden_size)
    max_length = cached + steps + 4
    caches = {
        "dynamic": span.new_cache(),
        "static": StaticSessionCache(span.family, span.config, span.start, span.end, max_length),
    }
    for cache in caches.values():
        span(x0, cache)
        span(x, cache)
    times: dict[str, list[float]] = {name: [] for name in caches}
    order = list(caches.items())
    for index in range(steps):
        # Alternate, in ABBA order: drifting load on the machine hits both alike.
        for name, cache in order if index % 2 == 0 else order[::-1]:
            cache.rollback(cached + 1)
            started = time.perf_counter()
            span(x, cache)
            times[name].append(time.perf_counter() - started)
    dynamic, static = (statistics.median(times[k]) * 1000 for k in ("dynamic", "static"))
    return {
        "cached_tokens": cached,
        "dynamic_ms": round(dynamic, 4),
        "static_ms": round(static, 4),
        "static_over_dynamic": round(static / dynamic, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"torch": torch.__version__, "threads": args.threads, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_span(open_checkpoint(make_tiny_model("llama", f"{tmp}/tiny")), 0, 6)
        report["tiny_llama_6_blocks"] = [measure(tiny, n, args.steps) for n in (16, 128, 1024)]
        small = load_span(open_checkpoint(smollm2_shaped(Path(tmp) / "smol", 8)), 0, 8)
        report["smollm2_shaped_8_blocks"] = [measure(small, n, args.steps) for n in (128, 2048)]
    ratios = [row["static_over_dynamic"] for rows in report.values() if isinstance(rows, list) for row in rows]
    report["static_never_slower"] = all(r <= 1.02 for r in ratios)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
