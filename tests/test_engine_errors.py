"""Bad input gets a clear EngineError naming the problem, never a traceback from deep inside."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from corolla.swarm.models import (
    BlockRangeError,
    CheckpointError,
    DeviceError,
    EngineError,
    LoadOptions,
    UnsupportedArchitectureError,
    load_client_parts,
    load_span,
    open_checkpoint,
)
from corolla.swarm.models.devices import check_dtype_supported, resolve_device, resolve_dtype


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_models.get("llama"), target)
    return target


def _shard_of(folder, tensor_name: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor_name]


def test_unknown_architecture_names_the_supported_ones(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as info:
        open_checkpoint(model_copy)
    message = str(info.value)
    assert "'gpt2'" in message
    for supported in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "phi3",
        "mixtral",
        "falcon",
        "bloom",
    ):
        assert supported in message


def test_missing_shard(model_copy):
    (model_copy / _shard_of(model_copy, "model.layers.3.mlp.up_proj.weight")).unlink()
    load_span(model_copy, 0, 2)  # other blocks still load
    with pytest.raises(CheckpointError, match="missing"):
        load_span(model_copy, 2, 4)


def test_corrupt_shard(model_copy):
    shard = model_copy / _shard_of(model_copy, "model.layers.1.mlp.up_proj.weight")
    shard.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_span(model_copy, 0, 3)


def test_truncated_shard(model_copy):
    shard = model_copy / _shard_of(model_copy, "model.layers.1.mlp.up_proj.weight")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_span(model_copy, 1, 2)


def test_tensor_with_wrong_shape(model_copy):
    from safetensors.torch import load_file, save_file

    shard = model_copy / _shard_of(model_copy, "model.layers.0.mlp.up_proj.weight")
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shape"):
        load_span(model_copy, 0, 1)


def test_index_pointing_at_a_missing_tensor(model_copy):
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    other_shard = _shard_of(model_copy, "model.layers.5.mlp.up_proj.weight")
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = other_shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks tensor"):
        load_span(model_copy, 0, 1)


def test_tensor_absent_from_checkpoint(model_copy):
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.2.self_attn.q_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        load_span(model_copy, 2, 3)


def test_index_with_path_traversal_is_refused(model_copy):
    index_path = model_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(model_copy)


def test_pickle_only_checkpoint_is_refused(model_copy):
    for path in model_copy.glob("model*.safetensors*"):
        path.unlink()
    (model_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safetensors only"):
        open_checkpoint(model_copy)


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        open_checkpoint(tmp_path / "empty")


def test_invalid_config_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        open_checkpoint(model_copy)


@pytest.mark.parametrize("blocks", [(-1, 2), (4, 7), (3, 3), (5, 2), (0, 100)])
def test_block_range_outside_the_model(tiny_models, blocks):
    with pytest.raises(BlockRangeError, match=r"\[0, 6\)"):
        load_span(tiny_models.get("llama"), *blocks)


def test_unknown_dtype(tiny_models):
    with pytest.raises(DeviceError, match="float8"):
        load_span(tiny_models.get("llama"), 0, 1, LoadOptions(dtype="float8"))


def test_unknown_quantization(tiny_models):
    with pytest.raises(DeviceError, match="int3"):
        load_span(tiny_models.get("llama"), 0, 1, LoadOptions(quantization="int3"))


def test_client_parts_are_never_quantized(tiny_models):
    with pytest.raises(EngineError, match="not quantized"):
        load_client_parts(tiny_models.get("llama"), LoadOptions(quantization="int8"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_a_gpu(tiny_models):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        load_span(tiny_models.get("llama"), 0, 1, LoadOptions(device="cuda"))


def test_nonsense_device():
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("gpu-please")


def test_bfloat16_refused_on_pre_ampere_gpu():
    with pytest.raises(DeviceError, match=r"compute capability 8\.0"):
        check_dtype_supported(torch.bfloat16, "cuda", (7, 5))
    check_dtype_supported(torch.bfloat16, "cuda", (8, 0))
    check_dtype_supported(torch.float16, "cuda", (7, 5))
    with pytest.raises(DeviceError, match="macOS 14"):
        check_dtype_supported(torch.bfloat16, "mps", None, mps_bfloat16=False)


def test_auto_dtype_rules():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert resolve_dtype("bfloat16", cpu, None) == torch.bfloat16


def test_bad_hidden_states(tiny_models):
    span = load_span(tiny_models.get("llama"), 0, 1)
    with pytest.raises(EngineError, match=r"\[batch, length, 64\]"):
        span(torch.randn(1, 2, 63))
    with pytest.raises(EngineError, match="floating point"):
        span(torch.ones(1, 2, 64, dtype=torch.long))
    with pytest.raises(EngineError, match="attention mask"):
        span(torch.randn(1, 2, 64), attention_mask=torch.ones(1, 5))
    with pytest.raises(EngineError, match="empty"):
        span(torch.randn(1, 0, 64))


def test_not_a_folder_nor_a_repo_id(tmp_path):
    with pytest.raises(EngineError, match="neither a folder"):
        open_checkpoint(str(tmp_path / "does" / "not" / "exist"))


def test_invalid_repo_ids_are_clear_errors(tmp_path):
    for name in ("not a repo!!", "a/b/c/d", "x" * 300, "bad\x00name"):
        with pytest.raises(EngineError):
            open_checkpoint(name, cache_dir=str(tmp_path), endpoint="http://127.0.0.1:9")
