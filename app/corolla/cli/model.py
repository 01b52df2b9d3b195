"""`corolla model info|make-tiny|import|generate`: models on this computer, no swarm involved."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from corolla.cli.common import check_model_argument
from corolla.units import human_bytes


def cmd_model_info(args: argparse.Namespace) -> int:
    check_model_argument(args.model)
    from corolla.swarm.models import open_checkpoint, resolve_dht_prefix
    from corolla.swarm.models.devices import checkpoint_dtype_of, dtype_name, resolve_device, resolve_dtype
    from corolla.swarm.models.errors import EngineError
    from corolla.swarm.models.loading import estimate_memory

    checkpoint = open_checkpoint(args.model, token=args.token, revision=args.revision)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.torch_dtype, device, checkpoint_dtype_of(checkpoint.config))
    estimate = estimate_memory(checkpoint, dtype, args.quant_type)
    try:
        prefix = resolve_dht_prefix(checkpoint, args.dht_prefix)
    except EngineError as exc:
        prefix = None
        prefix_note = str(exc)
    info = {
        "model": checkpoint.source_name,
        "model_type": checkpoint.config.model_type,
        "family": checkpoint.family.name,
        "num_blocks": checkpoint.num_blocks,
        "hidden_size": checkpoint.config.hidden_size,
        "dht_prefix": prefix,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "quant_type": args.quant_type,
        "bytes_per_block": max(estimate.per_block_bytes),
        "client_bytes": estimate.client_bytes,
        "total_bytes": estimate.total_bytes,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if "bytes" in key:
            value = human_bytes(value)
        print(f"{key:16} {value}")
    if prefix is None:
        print(f"{'':16} ({prefix_note})")
    return 0


def cmd_model_block_sizes(args: argparse.Namespace) -> int:
    """The node's block plan worked out in this process (node/hardware.py says why): the request as JSON
    on stdin, the sizes (or the error) as one JSON line on stdout."""
    from dataclasses import asdict

    from corolla.node.hardware import block_sizes_here

    request = json.loads(sys.stdin.read())
    try:
        sizes = block_sizes_here(**request)
    except Exception as exc:
        from corolla.swarm.models.errors import EngineError

        print(json.dumps({"error": str(exc), "engine_error": isinstance(exc, EngineError)}))
        return 1
    print(json.dumps(asdict(sizes)))
    return 0


def cmd_model_make_tiny(args: argparse.Namespace) -> int:
    from corolla.swarm.models.tiny import PRESETS, make_tiny_model

    if args.preset not in PRESETS:
        print(
            f"corolla: error: unknown preset {args.preset!r}; choose one of: {', '.join(sorted(PRESETS))}",
            file=sys.stderr,
        )
        return 2

    out = make_tiny_model(args.preset, args.out_dir, num_layers=args.layers, seed=args.seed, dht_prefix=args.dht_prefix)
    print(out)
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    """GGUF file -> checkpoint folder (safetensors shards, config with dht_prefix, tokenizer)."""
    from pathlib import Path

    from corolla.swarm.models.gguf_import import import_gguf

    source = Path(args.gguf_file)
    out = Path(args.out_dir) if args.out_dir else Path.cwd() / source.name.removesuffix(".gguf").replace(".", "-")
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    result = import_gguf(
        source, out, torch_dtype=args.torch_dtype, force=args.force, dht_prefix=args.dht_prefix, progress=progress
    )
    size = sum(item.stat().st_size for item in result.folder.iterdir() if item.is_file())
    print(result.folder)
    print(
        f"-- {result.model_type}, {result.num_parameters / 1e6:.0f} M parameters stored as {result.torch_dtype} "
        f"({human_bytes(size)}), DHT prefix {result.dht_prefix}; licence: {result.source.get('license') or 'unknown'}\n"
        f"-- serve it with: corolla serve {result.folder} --new-swarm",
        file=sys.stderr,
    )
    return 0


def cmd_model_generate(args: argparse.Namespace) -> int:
    """Greedy generation through locally loaded spans: the engine end to end, no swarm involved."""
    check_model_argument(args.model)
    import torch
    from transformers import AutoTokenizer

    from corolla.swarm.models import LoadOptions, load_client_parts, load_span, open_checkpoint

    checkpoint = open_checkpoint(args.model, token=args.token, revision=args.revision)
    options = LoadOptions(
        device=args.device,
        dtype=args.torch_dtype,
        quantization=args.quant_type,
        token=args.token,
        revision=args.revision,
    )
    client = load_client_parts(checkpoint, LoadOptions(device=args.device, dtype=args.torch_dtype))
    n = checkpoint.num_blocks
    parts = max(1, min(args.spans, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    spans = [load_span(checkpoint, a, b, options) for a, b in itertools.pairwise(bounds)]
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.fetch_tokenizer_files()))
    if tokenizer.chat_template and not args.raw:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template).input_ids
    caches = [span.new_cache() for span in spans]
    generated: list[int] = []
    started = time.perf_counter()
    current = ids
    printed = ""
    for _ in range(args.max_new_tokens):
        hidden = client.embed(current)
        for span, cache in zip(spans, caches, strict=True):
            hidden = span(hidden, cache)
        token = int(client.logits(hidden)[0, -1].float().argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        decoded = tokenizer.decode(generated, skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(decoded[len(printed) :])
            sys.stdout.flush()
            printed = decoded
        current = torch.tensor([[token]])
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    routes = ", ".join(f"[{s.start}:{s.end})" for s in spans)
    print(
        f"-- {len(generated)} tokens in {elapsed:.2f} s ({len(generated) / max(elapsed, 1e-9):.1f} tokens/s) "
        f"through spans {routes}",
        file=sys.stderr,
    )
    return 0
