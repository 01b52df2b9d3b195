"""The engine on a CUDA GPU: correctness in bf16 / int8 / nf4, and the per-token step time of a
Llama-3-8B-shaped span (random weights) against the memory-bandwidth floor measured in the same run.

Prints one JSON object (and writes it to $OUT/gpu_engine_check.json when OUT is set). Needs a GPU;
the test suite never depends on it. Usage: python benchmarks/gpu_engine_check.py [--blocks 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback

import torch

from corolla.swarm.models import LoadOptions, load_client_parts, load_span, open_checkpoint
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.models.tiny import make_tiny_model


def copy_bandwidth_gbps(device: torch.device, gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / reps
    del src, dst
    return 2 * n * 2 / seconds / 1e9


def chain_logits(folder, device, dtype, quantization, ids, forced=None):
    """Logits of the last position: a prefill of `ids`, then one cached step per token of `forced`
    (teacher forcing, so every variant sees the same tokens); greedy tokens when `forced` is None."""
    checkpoint = open_checkpoint(folder)
    client = load_client_parts(checkpoint, LoadOptions(device=device, dtype=dtype))
    spans = [
        load_span(checkpoint, a, b, LoadOptions(device=device, dtype=dtype, quantization=quantization))
        for a, b in ((0, 2), (2, 4), (4, 6))
    ]
    caches = [s.new_cache() for s in spans]
    outs, tokens = [], []
    cur = ids
    for step in range(6):
        h = client.embed(cur)
        for span, cache in zip(spans, caches, strict=True):
            h = span(h, cache)
        logits = client.logits(h).float()[:, -1]
        outs.append(logits.cpu())
        tokens.append(logits.argmax(-1, keepdim=True).cpu())
        cur = forced[:, step : step + 1] if forced is not None else tokens[-1]
    return torch.stack(outs), torch.cat(tokens, 1), sum(s.memory_bytes() for s in spans)


def correctness(device: str) -> dict:
    """Relative logit error against the same chain in fp32 on the GPU (the fp32 chain was shown exact
    against the full model on the CPU), teacher-forced on the fp32 chain's tokens."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("llama", "qwen2", "gemma2", "mixtral", "falcon", "bloom"):
            folder = make_tiny_model(preset, f"{tmp}/{preset}")
            ids = torch.randint(5, 500, (2, 9), generator=torch.Generator().manual_seed(0))
            ref, ref_tokens, ref_bytes = chain_logits(folder, device, "float32", "none", ids)
            row = {"fp32_span_bytes": ref_bytes}
            for dtype, quant in (("bfloat16", "none"), ("float16", "none"), ("float16", "int8"), ("bfloat16", "nf4")):
                key = f"{dtype}/{quant}"
                try:
                    got, _, nbytes = chain_logits(folder, device, dtype, quant, ids, forced=ref_tokens)
                    rel = ((got - ref).norm() / ref.norm()).item()
                    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
                    row[key] = {"rel_err": round(rel, 5), "argmax_agree": agree, "span_bytes": nbytes}
                except Exception as exc:  # report, keep going
                    row[key] = {"error": f"{type(exc).__name__}: {exc}"}
            results[preset] = row
    return results


def llama3_8b_span(device: torch.device, blocks: int, quantization: str) -> BlockSpan:
    """A span of Llama-3-8B-shaped blocks with random weights, built straight on the GPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from corolla.swarm.models.family import family_for
    from corolla.swarm.models.quantization import quantize_linear_layers

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=blocks,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    family = family_for("llama")
    layers = torch.nn.ModuleList(list(family.decoder_layers(model)))
    target = torch.device("cpu") if quantization != "none" else device
    layers = layers.to_empty(device=target)
    with torch.no_grad():
        for name, p in layers.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    if quantization != "none":
        quantize_linear_layers(layers, quantization, device, torch.bfloat16)
    return BlockSpan(
        family=family,
        config=config,
        start=0,
        end=blocks,
        layers=layers.eval(),
        rotary_emb=family.rotary_embedding(model).to(device),
        device=device,
        dtype=torch.bfloat16,
        quantization=quantization,
    )


def step_time(span: BlockSpan, prefix: int = 128, steps: int = 50) -> dict:
    """Median time of one cached step of a [1, 1, hidden] input, and where it goes: preparing the
    layer inputs (masks, rotary) versus running the layers, and the top CUDA and CPU ops."""
    from corolla.swarm.models.family import LayerCallContext

    device = span.device
    cache = span.new_cache()
    span(torch.randn(1, prefix, span.hidden_size, device=device, dtype=torch.bfloat16), cache)
    x = torch.randn(1, 1, span.hidden_size, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        span(x, cache)
    torch.cuda.synchronize()

    def timed(fn) -> float:
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2] * 1000

    step_ms = timed(lambda: span(x, cache))
    cache.rollback(prefix)

    def prepare():
        past = cache.length
        pos = torch.arange(past, past + 1, device=device).unsqueeze(0)
        ctx = LayerCallContext(
            config=span.config,
            rotary_emb=span.rotary_emb,
            hidden_states=x,
            cache=cache.cache,
            attention_mask=None,
            position_ids=pos,
            layer_types=frozenset(span.layer_types),
        )
        return span.family.layer_kwargs(ctx)

    with torch.inference_mode():
        prepare_ms = timed(prepare)
    row = {
        "median_ms": round(step_ms, 3),
        "prepare_inputs_ms": round(prepare_ms, 3),
        "weight_bytes": span.memory_bytes(),
        "cache_tokens": cache.length,
    }
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                span(x, cache)
            torch.cuda.synchronize()
        events = prof.key_averages()
        row["top_cuda_ops"] = [
            (e.key, round(e.device_time_total / 3000, 3))
            for e in sorted(events, key=lambda e: -e.device_time_total)[:6]
        ]
        row["top_cpu_ops"] = [
            (e.key, round(e.self_cpu_time_total / 3000, 3))
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
        ]
        row["cuda_ms_per_step"] = round(sum(e.self_device_time_total for e in events) / 3000, 3)
    except Exception as exc:
        row["profile_error"] = repr(exc)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda")
    report: dict = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}
    try:
        report["copy_bandwidth_gbps"] = round(copy_bandwidth_gbps(device), 1)
    except Exception:
        report["copy_bandwidth_error"] = traceback.format_exc(limit=2)
    try:
        report["tiny_correctness_vs_fp32"] = correctness("cuda")
    except Exception:
        report["tiny_correctness_error"] = traceback.format_exc()
    bandwidth = report.get("copy_bandwidth_gbps")
    report["llama3_8b_span"] = {"blocks": args.blocks}
    for quant in ("none", "int8", "nf4"):
        try:
            span = llama3_8b_span(device, args.blocks, quant)
            row = step_time(span)
            if bandwidth:
                floor_ms = row["weight_bytes"] / (bandwidth * 1e9) * 1000
                row["bandwidth_floor_ms"] = round(floor_ms, 3)
                row["x_floor"] = round(row["median_ms"] / floor_ms, 2)
            report["llama3_8b_span"][quant] = row
            del span
            torch.cuda.empty_cache()
        except Exception:
            report["llama3_8b_span"][quant] = {"error": traceback.format_exc(limit=3)}
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_engine_check.json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
