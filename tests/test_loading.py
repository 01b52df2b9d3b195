"""Partial loading: only the needed shards, nothing left on meta, dtypes, quantization, memory."""

from __future__ import annotations

import json

import pytest
import torch

from corolla.swarm.models import LoadOptions, load_client_parts, load_span, open_checkpoint
from corolla.swarm.models.loading import estimate_memory


def _index(folder) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("preset", ["llama", "mixtral", "bloom"])
def test_span_opens_only_its_shards_and_leaves_nothing_on_meta(tiny_models, preset):
    folder = tiny_models.get(preset, blocks_per_shard=1)
    checkpoint = open_checkpoint(folder)
    span = load_span(checkpoint, 2, 4)
    weight_map = _index(folder)
    expected = sorted(
        {
            shard
            for name, shard in weight_map.items()
            if any(f"{part}.{i}." in name for part in ("layers", "h") for i in (2, 3))
        }
    )
    assert sorted(set(checkpoint.opened_shards)) == expected
    assert len(checkpoint.opened_shards) == len(expected)  # each shard opened once
    all_shards = set(weight_map.values())
    assert len(all_shards) > len(expected)
    assert not any(p.is_meta for p in span.layers.parameters())
    assert not any(b.is_meta for b in span.layers.buffers())
    assert len(span.layers) == 2


def test_client_parts_open_only_non_block_shards(tiny_models):
    folder = tiny_models.get("llama")
    checkpoint = open_checkpoint(folder)
    client = load_client_parts(checkpoint)
    weight_map = _index(folder)
    client_shards = {shard for name, shard in weight_map.items() if ".layers." not in name}
    assert set(checkpoint.opened_shards) == client_shards
    assert not any(p.is_meta for p in client.model.parameters())
    assert len(client.family.decoder_layers(client.model)) == 0


def test_tied_head_shares_the_embedding(tiny_models):
    client = load_client_parts(tiny_models.get("llama-tied"))
    assert client.model.lm_head.weight is client.model.get_input_embeddings().weight


def test_memory_accounting_matches_parameters(tiny_models):
    folder = tiny_models.get("llama")
    checkpoint = open_checkpoint(folder)
    span = load_span(checkpoint, 0, 3)
    params = sum(p.numel() for p in span.layers.parameters())
    buffers = sum(b.numel() * b.element_size() for b in span.rotary_emb.buffers())
    assert span.memory_bytes() == params * 4 + buffers
    estimate = estimate_memory(checkpoint, torch.float32)
    assert sum(estimate.per_block_bytes[:3]) == params * 4
    client = load_client_parts(checkpoint)
    assert client.memory_bytes() >= estimate.client_bytes


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_choice(tiny_models, dtype):
    span = load_span(tiny_models.get("qwen3"), 0, 2, LoadOptions(dtype=dtype))
    assert {p.dtype for p in span.layers.parameters()} == {getattr(torch, dtype)}
    out = span(torch.randn(1, 3, 64), span.new_cache())
    assert out.dtype == getattr(torch, dtype) and torch.isfinite(out).all()


def test_auto_dtype_on_cpu_is_float32(tiny_models):
    span = load_span(tiny_models.get("llama"), 0, 1)
    assert span.dtype == torch.float32 and span.device.type == "cpu"


# Documented error bounds of quantized spans (relative L2 error of a 3-block span's output versus the
# same span in float32, tiny random models; see README "Quantization"). Measured on this machine:
# int8 0.9-1.6%, nf4 10.7-13.9%. Hidden size 64 is the worst case for nf4's 64-value blocks.
QUANT_BOUNDS = {"int8": 0.03, "nf4": 0.20}


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("preset", ["llama", "falcon", "bloom", "phi3"])
def test_quantized_span_stays_within_bound(tiny_models, preset, quantization):
    import bitsandbytes as bnb

    folder = tiny_models.get(preset)
    exact = load_span(folder, 0, 3, LoadOptions(dtype="float32"))
    quantized = load_span(folder, 0, 3, LoadOptions(dtype="float32", quantization=quantization))
    kinds = {type(m) for m in quantized.layers.modules()}
    assert kinds & {bnb.nn.Linear8bitLt, bnb.nn.Linear4bit}, "no linear layer was quantized"
    assert not any(type(m) is torch.nn.Linear for m in quantized.layers.modules())
    assert quantized.memory_bytes() < exact.memory_bytes()
    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))
    want = exact(hidden, exact.new_cache())
    got = quantized(hidden, quantized.new_cache()).float()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= QUANT_BOUNDS[quantization], f"{preset} {quantization}: relative error {rel:.4f}"


def test_rollback_replays_exactly(tiny_models):
    span = load_span(tiny_models.get("llama"), 0, 6)
    cache = span.new_cache()
    prompt = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
    step = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))
    span(prompt, cache)
    first = span(step, cache)
    span(torch.randn(1, 2, 64), cache)
    assert cache.length == 8
    cache.rollback(5)
    assert cache.length == 5
    again = span(step, cache)
    assert torch.equal(first, again)
    assert cache.nbytes() > 0


def test_sliding_window_cache_refuses_rollback_past_the_window(tiny_models):
    from corolla.swarm.models import CacheRollbackError

    span = load_span(tiny_models.get("mistral"), 0, 2)  # sliding window 4
    cache = span.new_cache()
    span(torch.randn(1, 6, 64), cache)
    with pytest.raises(CacheRollbackError, match="sliding-window"):
        cache.rollback(3)
    with pytest.raises(CacheRollbackError, match="position 9"):
        cache.rollback(9)


def test_tokenizer_loads_with_chat_template(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.get("llama"))
    text = "héllo wörld — 你好 🌸"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.unk_token_id


def test_factory_is_deterministic(tmp_path):
    from corolla.swarm.models.tiny import make_tiny_model

    a = make_tiny_model("mixtral", tmp_path / "a", num_layers=2)
    b = make_tiny_model("mixtral", tmp_path / "b", num_layers=2)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        if name.endswith(".safetensors"):
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_concurrent_skeletons_and_loads_do_not_interfere(tiny_models):
    """accelerate's meta-device patch is process-wide: loads in other threads must not land on meta."""
    from concurrent.futures import ThreadPoolExecutor

    from corolla.swarm.models.loading import estimate_memory

    checkpoint = open_checkpoint(tiny_models.get("llama"))
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(load_client_parts, checkpoint) for _ in range(6)]
        jobs += [pool.submit(estimate_memory, checkpoint, torch.float32) for _ in range(6)]
        jobs += [pool.submit(load_span, checkpoint, 0, 2) for _ in range(6)]
        for job in jobs:
            job.result()
