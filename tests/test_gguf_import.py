"""GGUF import: the real SmolLM2 file converted, and every way a file or an output can be wrong, each
with a real file (cut, damaged, renamed, patched) and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corolla.swarm.models.gguf_import import (
    CorruptGgufError,
    NotGgufError,
    OutputExistsError,
    UnsupportedGgufError,
    import_gguf,
)


def _copy(src: Path, dst: Path, limit: int | None = None) -> Path:
    with open(src, "rb") as reader, open(dst, "wb") as writer:
        if limit is None:
            shutil.copyfileobj(reader, writer)
        else:
            writer.write(reader.read(limit))
    return dst


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corolla.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _expect_failure(gguf: Path, out: Path, error: type, words: str) -> None:
    before = _entries(out.parent)
    with pytest.raises(error) as caught:
        import_gguf(gguf, out)
    assert words in str(caught.value)
    assert _entries(out.parent) == before  # no OUT, no temporary folder


def test_a_file_that_is_not_gguf(tiny_models, tmp_path):
    renamed = _copy(tiny_models.get("llama") / "model-00001-of-00008.safetensors", tmp_path / "model.gguf")
    _expect_failure(renamed, tmp_path / "out", NotGgufError, "is not a GGUF file")
    result = _cli("model", "import", str(renamed), str(tmp_path / "out"))
    assert result.returncode == 2 and "is not a GGUF file" in result.stderr and "Traceback" not in result.stderr


def test_a_cut_file(smollm2_gguf, tmp_path):
    cut = _copy(smollm2_gguf, tmp_path / "cut.gguf", limit=smollm2_gguf.stat().st_size // 2)
    _expect_failure(cut, tmp_path / "out", CorruptGgufError, "cut short")


def test_a_file_cut_inside_its_header(smollm2_gguf, tmp_path):
    cut = _copy(smollm2_gguf, tmp_path / "stub.gguf", limit=4096)
    _expect_failure(cut, tmp_path / "out", CorruptGgufError, "damaged GGUF file")


def test_a_damaged_header(smollm2_gguf, tmp_path):
    damaged = _copy(smollm2_gguf, tmp_path / "damaged.gguf")
    with open(damaged, "r+b") as handle:
        handle.seek(24)  # the first metadata key's length: now absurd
        handle.write(b"\xff" * 16)
    _expect_failure(damaged, tmp_path / "out", CorruptGgufError, "damaged GGUF file")


def _patched(source: Path, target: Path, patch) -> Path:
    from gguf import GGUFReader

    _copy(source, target)
    reader = GGUFReader(target, "r+")
    patch(reader)
    reader.data.flush()
    del reader
    return target


def test_an_architecture_corolla_does_not_serve(smollm2_gguf, tmp_path):
    def to_mamba(reader):
        field = reader.fields["general.architecture"]
        field.parts[field.data[0]][:] = list(b"mamba")  # same length, a family Corolla has no adapter for

    mamba = _patched(smollm2_gguf, tmp_path / "mamba.gguf", to_mamba)
    _expect_failure(mamba, tmp_path / "out", UnsupportedGgufError, "holds a 'mamba' model; Corolla serves")


def test_a_tensor_type_that_cannot_be_dequantized(smollm2_gguf, tmp_path):
    from gguf import GGMLQuantizationType

    def norm_as_int32(reader):
        tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        assert tensor.tensor_type == GGMLQuantizationType.F32  # same size per element as I32
        tensor.field.parts[4][0] = GGMLQuantizationType.I32

    patched = _patched(smollm2_gguf, tmp_path / "i32.gguf", norm_as_int32)
    _expect_failure(patched, tmp_path / "out", UnsupportedGgufError, "type I32 that cannot be de-quantized")


def test_an_existing_output_is_kept_without_force(smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        import_gguf(smollm2_gguf, out)
    result = _cli("model", "import", str(smollm2_gguf), str(out))
    assert result.returncode == 2 and "exists already" in result.stderr
    assert _entries(out) == ["mine.txt"] and _entries(tmp_path) == ["out"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root for a tmpfs mount")
def test_a_full_disk(smollm2_gguf, tmp_path):
    small = tmp_path / "small-disk"
    small.mkdir()
    script = (
        f"mount -t tmpfs -o size=40m corolla-test {small} && "
        f"{sys.executable} -m corolla.cli model import {smollm2_gguf} {small}/out; "
        f"echo rc=$?; ls -A {small}"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    if "mount:" in result.stderr and "rc=" not in result.stdout:
        pytest.skip(f"no tmpfs mount here: {result.stderr[-300:]}")
    assert "rc=2" in result.stdout, result.stderr[-2000:]
    assert "not enough free space" in result.stderr and "MiB are free" in result.stderr
    assert result.stdout.strip().endswith("rc=2")  # `ls -A` printed nothing: nothing left behind


# --- the real conversion ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_converted_smollm2_folder(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corolla.swarm.models import open_checkpoint, resolve_dht_prefix

    index = json.loads((smollm2 / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((smollm2 / shard).is_file() for shard in shards)
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["dht_prefix"] == "SmolLM2-135M-Instruct-Q4_1-hf"
    assert config["rope_theta"] == 100000.0  # the legacy key transformers 4.x (stock Petals) reads
    record = json.loads((smollm2 / "corolla-import.json").read_text())
    assert record["license"] == "apache-2.0" and record["torch_dtype"] == "bfloat16"
    assert record["num_parameters"] == 134_515_008

    checkpoint = open_checkpoint(smollm2)
    assert checkpoint.num_blocks == 30 and resolve_dht_prefix(checkpoint) == config["dht_prefix"]
    # A span of the last blocks reads only the shards holding them.
    assert len(checkpoint.shards_for(checkpoint.block_tensor_names(25, 30))) < len(shards)

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_an_interrupted_import_leaves_nothing_and_the_next_one_completes(smollm2_gguf, tmp_path, tmp_path_factory):
    """SmolLM2's import is killed mid-way (it takes long enough to be caught de-quantizing); the next
    import into the same folder, of a tiny Qwen2 file (seconds, not another full SmolLM2 conversion:
    the session's `smollm2` fixture is that), removes what the kill left and completes."""
    from tests.support.gguf_files import write_tiny_qwen2_gguf

    out = tmp_path / "smol"
    command = [sys.executable, "-m", "corolla.cli", "model", "import", str(smollm2_gguf), str(out)]
    killed = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    for line in killed.stderr:  # progress on the terminal, one line per stage
        if "de-quantizing" in line or time.monotonic() > deadline:
            break
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".smol.partial-")]  # what the kill left

    next_gguf, _ = write_tiny_qwen2_gguf(tmp_path_factory.mktemp("next-import"))
    result = _cli("model", "import", str(next_gguf), str(out), "--torch-dtype", "float16")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("reading", "converting the tokenizer", "de-quantizing", "writing safetensors", "done in"):
        assert stage in result.stderr
    assert result.stdout.strip() == str(out)
    assert _entries(tmp_path) == ["smol"]  # the killed import's leftover was removed
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


# --- other families: a tiny Qwen2 written by the gguf package's own writer ----------------------


@pytest.mark.parametrize("quantization", ["F32", "Q8_0"])
def test_a_qwen2_gguf_imports_as_the_model_it_was_made_from(tmp_path, quantization):
    import torch
    from transformers import AutoModelForCausalLM

    from corolla.swarm.models import open_checkpoint
    from tests.support.gguf_files import write_tiny_qwen2_gguf

    gguf_path, original = write_tiny_qwen2_gguf(tmp_path, quantization)
    result = import_gguf(gguf_path, tmp_path / "qwen2")
    # auto dtype: the file's own float type, bfloat16 where it was quantized
    assert result.torch_dtype == ("float32" if quantization == "F32" else "bfloat16")
    assert result.model_type == "qwen2" and result.dht_prefix == f"tiny-qwen2-{quantization}"
    assert open_checkpoint(result.folder).config.model_type == "qwen2"
    imported = AutoModelForCausalLM.from_pretrained(result.folder, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 40, 77, 12, 300, 9, 8, 100]])
    with torch.no_grad():
        want, got = original(ids).logits, imported(ids).logits
    if quantization == "F32":
        assert torch.equal(got, want)  # names, biases, head layout: all mapped back exactly
    else:
        assert (got - want).abs().max() < 0.05 * want.abs().max()  # Q8_0 rounding, then bfloat16
    # Corolla's engine runs it split in two spans.
    run = _cli("model", "generate", str(result.folder), "--prompt", "hello", "--max-new-tokens", "4", "--spans", "2")
    assert run.returncode == 0, run.stderr[-2000:]


def test_force_replaces_an_existing_folder_only_once_the_new_one_is_complete(tmp_path):
    from tests.support.gguf_files import write_tiny_qwen2_gguf

    gguf_path, _ = write_tiny_qwen2_gguf(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier import")
    result = _cli("model", "import", str(gguf_path), str(out), "--force", "--dht-prefix", "my-qwen")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dht_prefix"] == "my-qwen"
    assert _entries(tmp_path) == ["out", "src"]  # no temporary or old folder left
