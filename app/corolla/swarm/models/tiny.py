"""Tiny random-weight models of every supported family, built offline and deterministically.

Tests and the offline demo use them: a checkpoint folder laid out like a hub repo (config.json,
sharded safetensors with an index, block tensors grouped by block, a byte-level BPE tokenizer with a
chat template), read by the real loading code. The weights are random: the text they produce is noise.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from corolla.swarm.models.family import block_index_of

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a petals server hosts a contiguous span of transformer blocks",
    "the client runs embeddings and the language model head locally",
    "corolla lets anyone join a swarm and chat with a large language model",
    "hello world, this is a tiny random model for testing",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Once upon a time there was a little model that could generate tokens.",
    "user assistant system: how are you? I am fine, thank you!",
]
TOKENIZER_VOCAB = 512

# Small enough to run in milliseconds, big enough that every code path (GQA, sliding windows shorter
# than a prompt, several experts) is exercised.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def _llama(n, tie=False):
    from transformers import LlamaConfig

    return LlamaConfig(**_COMMON, num_hidden_layers=n, num_key_value_heads=2, tie_word_embeddings=tie)


def _mistral(n):
    from transformers import MistralConfig

    return MistralConfig(
        **_COMMON, num_hidden_layers=n, num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False
    )


def _qwen2(n):
    from transformers import Qwen2Config

    return Qwen2Config(
        **_COMMON,
        num_hidden_layers=n,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=n // 2,
        tie_word_embeddings=False,
    )


def _qwen3(n):
    from transformers import Qwen3Config

    return Qwen3Config(**_COMMON, num_hidden_layers=n, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def _gemma2(n):
    from transformers import Gemma2Config

    return Gemma2Config(
        **_COMMON,
        num_hidden_layers=n,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    )


def _gemma3(n):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_COMMON, num_hidden_layers=n, num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16
    )


def _phi3(n):
    from transformers import Phi3Config

    return Phi3Config(**_COMMON, num_hidden_layers=n, num_key_value_heads=2, tie_word_embeddings=False)


def _mixtral(n):
    from transformers import MixtralConfig

    return MixtralConfig(
        **_COMMON,
        num_hidden_layers=n,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )


def _falcon(n):
    from transformers import FalconConfig

    # Falcon-40B/180B shape: new decoder architecture, grouped kv heads, rotary.
    return FalconConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=n,
        num_kv_heads=2,
        new_decoder_architecture=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _falcon_alibi(n):
    from transformers import FalconConfig

    # Falcon-RW shape: sequential attention and MLP with biases, alibi positions.
    return FalconConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=n,
        multi_query=False,
        new_decoder_architecture=False,
        parallel_attn=False,
        bias=True,
        alibi=True,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def _bloom(n):
    from transformers import BloomConfig

    return BloomConfig(
        hidden_size=64, n_head=4, n_layer=n, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=3
    )


PRESETS: dict[str, Callable[[int], object]] = {
    "llama": _llama,
    "llama-tied": lambda n: _llama(n, tie=True),
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
    "phi3": _phi3,
    "mixtral": _mixtral,
    "falcon": _falcon,
    "falcon-alibi": _falcon_alibi,
    "bloom": _bloom,
}


def build_tokenizer():
    """A byte-level BPE tokenizer (any UTF-8 text round-trips) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    preset: str,
    out_dir: str | Path,
    *,
    num_layers: int = 6,
    seed: int = 0,
    blocks_per_shard: int = 1,
    dht_prefix: str | None = None,
) -> Path:
    """Write a tiny random model of `preset` to `out_dir` and return the folder.

    Shards hold `blocks_per_shard` blocks each; embeddings sit in the first shard and the final norm
    and head in the last, as in real checkpoints. Same arguments, same bytes.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = PRESETS[preset](num_layers)
    config.vocab_size = max(TOKENIZER_VOCAB, len(tokenizer))
    if dht_prefix is not None:
        config.dht_prefix = dht_prefix  # read by stock Petals for local folders
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size="100GB")  # one file, checkpoint (legacy) tensor names
        state = load_file(str(Path(tmp) / "model.safetensors"))
        (out / "config.json").write_text((Path(tmp) / "config.json").read_text())
    _write_shards(state, out, blocks_per_shard)
    tokenizer.save_pretrained(str(out))
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("</s>", "<|im_end|>")]
    GenerationConfig(bos_token_id=1, eos_token_id=eos, pad_token_id=3).save_pretrained(str(out))
    (out / "README.md").write_text(
        f"# Tiny random {preset} model\n\nRandom weights (seed {seed}) made by corolla for tests and the "
        "offline demo. Its output is noise.\n"
    )
    return out


def _write_shards(state: dict[str, torch.Tensor], out: Path, blocks_per_shard: int) -> None:
    groups: dict[int, dict[str, torch.Tensor]] = {}
    last_group = 0
    for name, tensor in state.items():
        index = block_index_of(name)
        if index is not None:
            group = 1 + index // blocks_per_shard
            last_group = max(last_group, group)
            groups.setdefault(group, {})[name] = tensor
    for name, tensor in state.items():
        if block_index_of(name) is None:
            is_input_side = "embed" in name or "wte" in name or "word_embeddings" in name
            groups.setdefault(0 if is_input_side else last_group + 1, {})[name] = tensor
    ordered = [groups[k] for k in sorted(groups)]
    weight_map, total = {}, 0
    for number, tensors in enumerate(ordered, start=1):
        shard = f"model-{number:05d}-of-{len(ordered):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / shard), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
