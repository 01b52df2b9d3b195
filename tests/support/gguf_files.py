"""Write a tiny model as a GGUF file with the `gguf` package's own writer (llama.cpp's tensor names
and metadata keys), so imports of families other than SmolLM2's can be checked against the original."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_tiny_qwen2_gguf(out_dir: Path, quantization: str = "F32") -> tuple[Path, object]:
    """A 2-block Qwen2 (q/k/v biases, grouped kv heads) as `tiny-qwen2.gguf`; returns (file, model)."""
    import gguf
    from transformers import AutoModelForCausalLM, Qwen2Config

    from corolla.swarm.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tiny-qwen2.{quantization}.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2 mistral-free test model")
    writer.add_license("mit")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quantization == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)

    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = [" ".join(pair) for pair in _merges(tokenizer)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, quantization)
    for name, tensor in model.state_dict().items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        data = tensor.numpy().astype(np.float32)
        if qtype != gguf.GGMLQuantizationType.F32 and data.ndim == 2:
            quantized = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_name, quantized, raw_shape=quantized.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def _merges(tokenizer) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
