"""Peak memory and wall time: loading a span of 1/4 of the blocks versus a full `from_pretrained`.

Both loads memory-map the safetensors files, so every loaded weight is read once before the peak is
taken (a serving process reads them all on its first step). Builds a Llama-shaped checkpoint with
random float16 weights (by default ~1.6 B parameters, 3.2 GB on disk, one block per shard), then
loads it in fresh processes, one measurement each, all in this run. Prints JSON. Target: the
span's peak RSS is at most 0.35x the full load's.

Usage: python benchmarks/load_memory.py [--layers 32] [--hidden 2048] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

TARGET_RATIO = 0.35

# Run in a fresh interpreter: imports first (their RSS is the baseline), then the load itself.
PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from transformers import AutoModelForCausalLM
    from corolla.swarm.models import LoadOptions, load_span
    kind, folder, start, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "span":
        part = load_span(folder, start, end, LoadOptions(dtype="float16"))
        held = part.memory_bytes()
    else:
        part = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
        held = sum(p.numel() * p.element_size() for p in part.parameters())
    seconds = time.perf_counter() - t0
    # Safetensors are memory-mapped: weights become resident only when read. Serving reads every
    # weight each step, so touch them all before reading the peak.
    module = part.layers if kind == "span" else part
    for p in module.parameters():
        torch.sum(p, dtype=torch.float32)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_kib * 1024,
                      "import_rss_bytes": baseline_kib * 1024, "weights_held_bytes": held}))
    """
)


def make_checkpoint(folder: Path, layers: int, hidden: int) -> int:
    """Write a random-weight Llama checkpoint shard by shard (never the whole model in memory)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from corolla.swarm.models.family import block_index_of

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        vocab_size=32000,
        tie_word_embeddings=False,
        dtype="float16",
    )
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    groups: dict[int, list[str]] = {}
    for name in shapes:
        index = block_index_of(name)
        groups.setdefault(-1 if index is None else index, []).append(name)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    ordered = sorted(groups)
    for number, group in enumerate(ordered, start=1):
        shard = f"model-{number:05d}-of-{len(ordered):05d}.safetensors"
        tensors = {}
        for name in groups[group]:
            t = torch.empty(shapes[name], dtype=torch.float16)
            t.normal_(0.0, 0.02, generator=generator) if "norm" not in name else t.fill_(1.0)
            tensors[name] = t
            weight_map[name] = shard
            total += t.numel() * 2
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def measure(kind: str, folder: Path, start: int, end: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, kind, str(folder), str(start), str(end)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--keep", default=None, help="build (or reuse) the checkpoint in this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / f"llama-{args.layers}x{args.hidden}"
        if not (folder / "model.safetensors.index.json").exists():
            checkpoint_bytes = make_checkpoint(folder, args.layers, args.hidden)
        else:
            checkpoint_bytes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"][
                "total_size"
            ]
        span_end = args.layers // 4
        span = measure("span", folder, 0, span_end)
        full = measure("full", folder, 0, args.layers)
    ratio = span["peak_rss_bytes"] / full["peak_rss_bytes"]
    net_ratio = (span["peak_rss_bytes"] - span["import_rss_bytes"]) / (
        full["peak_rss_bytes"] - full["import_rss_bytes"]
    )
    print(
        json.dumps(
            {
                "checkpoint_bytes": checkpoint_bytes,
                "layers": args.layers,
                "span": {"blocks": [0, span_end], **span},
                "full_from_pretrained": full,
                "peak_rss_ratio": round(ratio, 3),
                "peak_rss_ratio_net_of_imports": round(net_ratio, 3),
                "wall_time_ratio": round(span["seconds"] / full["seconds"], 3),
                "target_ratio": TARGET_RATIO,
                "meets_target": ratio <= TARGET_RATIO,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
