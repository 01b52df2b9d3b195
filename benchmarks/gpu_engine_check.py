"""The engine on a CUDA GPU: correctness in bf16 / int8 / nf4, and the per-token decode step of a
Llama-3-8B-shaped span (random weights) against the GPU's kernel time and the memory-bandwidth floor,
all measured in the same run:

- span_decode: an 8-block span, batch 1 at 128 and 2048 cached tokens, bf16 / int8 / nf4; per mode
  (the eager dynamic cache, the eager static cache, the CUDA-graph fast path) the wall time per step,
  the kernel time per step (profiler) and the floor (weight bytes / copy bandwidth); and batch 8
  tokens/s. Targets: graph wall <= 1.3x kernel time and <= 2.5x the floor.
- hf_generate: transformers' own generate() of the same 8 layers (eager; static cache + compile).
- end_to_end: `corolla serve` with a 32-block Llama-3-8B-shaped model and a Corolla client on
  loopback, tokens/s, beside the 32-block floor.

Prints one JSON object (and writes it to $OUT/gpu_engine_check.json when OUT is set). Needs a GPU,
except with --cpu-smoke (tiny shapes on the CPU: checks that every part runs). Sections that would
pass --budget-s are skipped and say so. Usage:
    python benchmarks/gpu_engine_check.py [--blocks 8] [--budget-s 480]
    python benchmarks/gpu_engine_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

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
    sync(device)
    reps = 10
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    seconds = (time.perf_counter() - started) / reps
    del src, dst
    return 2 * n * 2 / seconds / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def llama_config(smoke: bool, blocks: int, vocab: int = 128256):
    from transformers import LlamaConfig

    if smoke:  # tiny Llama-3 proportions, so that every part runs on a CPU in seconds
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=896,
            num_hidden_layers=blocks,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=min(vocab, 512),
            max_position_embeddings=8192,
        )
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=blocks,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=vocab,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    )


def llama3_8b_span(
    device: torch.device, blocks: int, quantization: str, smoke: bool = False, dtype=torch.bfloat16
) -> BlockSpan:
    """A span of Llama-3-8B-shaped blocks with random weights, built straight on the device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from corolla.swarm.models.family import family_for
    from corolla.swarm.models.quantization import quantize_linear_layers

    config = llama_config(smoke, blocks)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
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
        quantize_linear_layers(layers, quantization, device, dtype)
    return BlockSpan(
        family=family,
        config=config,
        start=0,
        end=blocks,
        layers=layers.eval(),
        rotary_emb=family.rotary_embedding(model).to(device),
        device=device,
        dtype=dtype,
        quantization=quantization,
    )


def _median_ms(fn, steps: int, device: torch.device, before=None) -> float:
    times = []
    for _ in range(steps):
        if before is not None:
            before()
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _kernel_ms(fn, device: torch.device, before=None, reps: int = 5) -> float | None:
    """GPU kernel time per call (the profiler's device time), None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            if before is not None:
                before()
            fn()
        sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / reps


def _event_ms(fn, device: torch.device, before, reps: int = 10) -> float:
    """Median GPU time between CUDA events around one call: kernels plus the GPU's idle gaps."""
    times = []
    for _ in range(reps):
        before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def decode_modes(span: BlockSpan, cached: int, steps: int, batch: int = 1) -> dict:
    """Per mode, one decode step of `batch` x 1 token after `cached` tokens: wall and kernel time."""
    device, hidden = span.device, span.hidden_size
    max_length = cached + 16
    prefill = torch.randn(batch, cached, hidden, device=device, dtype=span.dtype)
    x = torch.randn(batch, 1, hidden, device=device, dtype=span.dtype)
    modes = {
        "eager_dynamic": lambda: span.new_cache(),
        "eager_static": lambda: span.new_cache(max_length, batch=batch, static=True),
    }
    if device.type == "cuda":
        modes["cuda_graph"] = lambda: span.new_cache(max_length, batch=batch)
    rows = {}
    for mode, make in modes.items():
        cache = make()
        if mode == "eager_static" and getattr(cache, "decoder", None) is not None:
            cache.decoder = None  # the static cache alone, without graphs
        span(prefill, cache)
        for _ in range(3):  # allocation, capture, first replay
            cache.rollback(cached)
            span(x, cache)

        def rollback(cache=cache):
            cache.rollback(cached)

        def step(cache=cache):
            span(x, cache)

        row = {"wall_ms": round(_median_ms(step, steps, device, before=rollback), 3)}
        kernel = _kernel_ms(step, device, before=rollback)
        if kernel is not None:
            row["kernel_ms"] = round(kernel, 3)
            row["gpu_event_ms"] = round(_event_ms(step, device, rollback), 3)
        rows[mode] = row
        del cache
    if device.type == "cuda":
        # The GPU kernel time of a step: the profiler's sum for the eager static step (the same
        # kernels a graph replays; the profiler may not see inside a graph).
        kernel = rows["eager_static"]["kernel_ms"]
        for row in rows.values():
            row["wall_over_kernel"] = round(row["wall_ms"] / kernel, 2)
    if device.type == "cuda":
        fast = span.fast_path
        rows["cuda_graph"]["graph_used"] = fast.replays > 0
        if fast.failures:
            rows["cuda_graph"]["fell_back_because"] = fast.last_failure
    return rows


def span_decode(
    device: torch.device, blocks: int, smoke: bool, bandwidth: float | None, deadline: float, quants: list[str]
) -> dict:
    report: dict = {"blocks": blocks}
    lengths = (16, 64) if smoke else (128, 2048)
    if smoke or not _has_bitsandbytes():
        for quant in set(quants) - {"none"}:
            report[quant] = {"skipped": "bitsandbytes is not installed" if not smoke else "CUDA only"}
        quants = [q for q in quants if q == "none"]
    steps = 10 if smoke else 30
    for quant in quants:
        if time.monotonic() > deadline:
            report[quant] = {"skipped": "time budget spent"}
            continue
        try:
            dtype = torch.float32 if smoke else torch.bfloat16
            span = llama3_8b_span(device, blocks, quant, smoke, dtype)
            row: dict = {"weight_bytes": span.memory_bytes()}
            if bandwidth:
                row["bandwidth_floor_ms"] = round(span.memory_bytes() / (bandwidth * 1e9) * 1000, 4)
            for cached in lengths:
                modes = decode_modes(span, cached, steps)
                if bandwidth:
                    for mode in modes.values():
                        mode["wall_over_floor"] = round(mode["wall_ms"] / row["bandwidth_floor_ms"], 2)
                row[f"batch1_cached{cached}"] = modes
            batch8 = decode_modes(span, lengths[0], steps, batch=8)
            row[f"batch8_cached{lengths[0]}_tokens_per_s"] = {
                mode: round(8 / (values["wall_ms"] / 1000), 1) for mode, values in batch8.items()
            }
            graph = row[f"batch1_cached{lengths[0]}"].get("cuda_graph")
            if graph and "kernel_ms" in graph and bandwidth:
                row["targets"] = {
                    "graph_wall_le_1.3x_kernel": all(
                        row[f"batch1_cached{n}"]["cuda_graph"]["wall_over_kernel"] <= 1.3 for n in lengths
                    ),
                    "graph_wall_le_2.5x_floor": all(
                        row[f"batch1_cached{n}"]["cuda_graph"]["wall_over_floor"] <= 2.5 for n in lengths
                    ),
                }
            report[quant] = row
            del span
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception:
            report[quant] = {"error": traceback.format_exc(limit=4)}
    return report


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def hf_generate(device: torch.device, blocks: int, smoke: bool, compiled: bool, cached: int = 128) -> dict:
    """transformers' generate() over the same kind of 8 layers (a 128-token vocabulary, so that the
    head and embeddings cost nothing): seconds per new token, from two lengths (prefill cancels out)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if smoke else torch.bfloat16
    config = llama_config(smoke, blocks, vocab=128)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 128, (1, cached), device=device)
    kwargs: dict = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    if compiled:
        # A static cache; on CUDA generate() then compiles the forward (its own auto-compile rule).
        kwargs["cache_implementation"] = "static"

    def run(new: int) -> float:
        sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        sync(device)
        return time.perf_counter() - started

    short, long = 8, 40
    warm_started = time.perf_counter()
    run(short)  # warm-up; with a static cache each length is its own cache shape, so its own compile
    run(long)
    warm_s = time.perf_counter() - warm_started
    per_token = (min(run(long) for _ in range(2)) - min(run(short) for _ in range(2))) / (long - short)
    return {
        "ms_per_token": round(per_token * 1000, 3),
        "tokens_per_s": round(1 / per_token, 1),
        "warmup_s": round(warm_s, 1),
        "compiled": compiled and device.type == "cuda",  # generate()'s auto-compile rule: static cache on CUDA
    }


def write_checkpoint(folder: Path, smoke: bool, blocks: int, device: torch.device) -> Path:
    """A Llama-3-8B-shaped checkpoint with random weights (a small vocabulary), block by block."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from corolla.swarm.models.tiny import build_tokenizer

    config = llama_config(smoke, blocks, vocab=512)
    config.dht_prefix = "bench-llama3-hf"
    folder.mkdir(parents=True, exist_ok=True)
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: p.shape for name, p in skeleton.state_dict().items()}
    weight_map: dict[str, str] = {}
    groups: dict[str, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        block = name.split(".")[2] if name.startswith("model.layers.") else "client"
        groups.setdefault(block, {})[name] = shape
    total = 0
    for number, (_, tensors) in enumerate(sorted(groups.items()), start=1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        data = {}
        for name, shape in tensors.items():
            on = torch.ones(shape, device=device, dtype=torch.bfloat16) if "norm" in name else None
            data[name] = (
                on if on is not None else torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
            ).cpu()
            weight_map[name] = shard
            total += data[name].numel() * 2
        save_file(data, str(folder / shard), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.torch_dtype = "bfloat16"
    (folder / "config.json").write_text(config.to_json_string())
    build_tokenizer().save_pretrained(str(folder))
    return folder


def end_to_end(device: torch.device, smoke: bool, bandwidth: float | None, new_tokens: int = 64) -> dict:
    """`corolla serve` (all blocks, one server) + a Corolla client on loopback: greedy tokens/s."""
    import corolla
    from corolla.testing.swarm import CorollaServer

    blocks = 4 if smoke else 32
    dtype = "float32" if smoke else "bfloat16"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        model = write_checkpoint(tmp / "model", smoke, blocks, device)
        row: dict = {"blocks": blocks, "write_checkpoint_s": round(time.perf_counter() - started, 1)}
        started = time.perf_counter()
        server = CorollaServer(
            tmp,
            model,
            "--new-swarm",
            "--blocks",
            f"0:{blocks}",
            "--torch-dtype",
            dtype,
            "--device",
            device.type,
            "--throughput",
            "10",
            name="e2e",
        )
        try:
            server.wait_state("online")
            row["server_start_s"] = round(time.perf_counter() - started, 1)
            prompt = torch.tensor([[1, 384, 456, 300, 17]])
            with corolla.AutoDistributedModelForCausalLM.from_pretrained(
                model, initial_peers=[server.maddr], dht_prefix="bench-llama3-hf", use_relay=False, auto_nat=False
            ) as remote:
                remote.generate(prompt, max_new_tokens=4, eos_token_id=[])  # warm-up

                def run(n: int) -> float:
                    t0 = time.perf_counter()
                    remote.generate(prompt, max_new_tokens=n, eos_token_id=[])
                    return time.perf_counter() - t0

                short = min(run(4) for _ in range(2))
                long = min(run(new_tokens) for _ in range(2))
            per_token = (long - short) / (new_tokens - 4)
            row["tokens_per_s"] = round(1 / per_token, 1)
            row["ms_per_token"] = round(per_token * 1000, 3)
        finally:
            server.stop()
    if bandwidth:
        span_bytes = blocks * 2 * _block_params(llama_config(smoke, 1))
        row["floor_ms_per_token"] = round(span_bytes / (bandwidth * 1e9) * 1000, 3)
        row["floor_tokens_per_s"] = round(1000 / row["floor_ms_per_token"], 1)
    return row


def _block_params(config) -> int:
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: check that it runs")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip what would start after this")
    parser.add_argument("--skip", nargs="*", default=(), help="sections to skip: correctness hf e2e")
    parser.add_argument("--quants", nargs="*", default=["none", "int8", "nf4"], choices=["none", "int8", "nf4"])
    args = parser.parse_args()
    began = time.monotonic()
    deadline = began + args.budget_s
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    report: dict = {
        "device": "cpu (smoke: tiny shapes, figures mean nothing)" if smoke else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
    }
    try:
        report["copy_bandwidth_gbps"] = round(copy_bandwidth_gbps(device, 0.25 if smoke else 4.0), 1)
    except Exception:
        report["copy_bandwidth_error"] = traceback.format_exc(limit=2)
    bandwidth = report.get("copy_bandwidth_gbps")
    if not smoke and "correctness" not in args.skip:
        try:
            report["tiny_correctness_vs_fp32"] = correctness("cuda")
        except Exception:
            report["tiny_correctness_error"] = traceback.format_exc()
    report["span_decode"] = span_decode(device, 2 if smoke else args.blocks, smoke, bandwidth, deadline, args.quants)
    if "hf" not in args.skip:
        report["hf_generate"] = {}
        for compiled in (False, True):
            key = "static_cache_compile" if compiled else "eager"
            if time.monotonic() > deadline:
                report["hf_generate"][key] = {"skipped": "time budget spent"}
                continue
            try:
                report["hf_generate"][key] = hf_generate(device, 2 if smoke else args.blocks, smoke, compiled)
            except Exception:
                report["hf_generate"][key] = {"error": traceback.format_exc(limit=3)}
        corolla_ms = report["span_decode"].get("none", {}).get("batch1_cached128", {}).get("cuda_graph", {})
        if corolla_ms and all("ms_per_token" in v for v in report["hf_generate"].values()):
            report["hf_generate"]["corolla_graph_step_beats_both"] = all(
                corolla_ms["wall_ms"] < v["ms_per_token"] for v in report["hf_generate"].values() if isinstance(v, dict)
            )
    if "e2e" not in args.skip:
        if time.monotonic() > deadline:
            report["end_to_end"] = {"skipped": "time budget spent"}
        else:
            try:
                report["end_to_end"] = end_to_end(device, smoke, bandwidth)
            except Exception:
                report["end_to_end"] = {"error": traceback.format_exc(limit=4)}
    report["wall_s"] = round(time.monotonic() - began, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        name = "gpu_engine_check" + ("" if set(args.quants) == {"none", "int8", "nf4"} else "." + "-".join(args.quants))
        with open(os.path.join(os.environ["OUT"], name + ".json"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
