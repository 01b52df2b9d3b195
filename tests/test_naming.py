"""DHT prefixes: Petals' rules for its four families, Corolla's documented rule for the rest."""

from __future__ import annotations

import json
import shutil

import pytest

from corolla.swarm.models import EngineError, family_for, open_checkpoint, resolve_dht_prefix


@pytest.mark.parametrize(
    ("model_type", "repo", "prefix"),
    [
        ("llama", "meta-llama/Meta-Llama-3.1-405B-Instruct", "Meta-Llama-3-1-405B-Instruct-hf"),
        ("llama", "petals-team/StableBeluga2", "StableBeluga2-hf"),
        ("llama", "meta-llama/Llama-2-70b-chat-hf", "Llama-2-70b-chat-hf"),
        ("bloom", "bigscience/bloom", "bigscience/bloom-petals"),
        ("bloom", "bigscience/bloomz-7b1", "bigscience/bloomz-7b1-petals"),
        ("falcon", "tiiuae/falcon-180B-chat", "falcon-180B-chat"),
        ("mixtral", "mistralai/Mixtral-8x22B-Instruct-v0.1", "mistralai/Mixtral-8x22B-Instruct-v0-1"),
        ("qwen2", "Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2-5-72B-Instruct"),
        ("gemma2", "google/gemma-2-27b-it", "google/gemma-2-27b-it"),
        ("phi3", "microsoft/Phi-3.5-mini-instruct", "microsoft/Phi-3-5-mini-instruct"),
    ],
)
def test_prefix_rules(model_type, repo, prefix):
    assert family_for(model_type).dht_prefix_from_repo(repo) == prefix


def test_local_folder_needs_an_explicit_prefix(tiny_models):
    checkpoint = open_checkpoint(tiny_models.get("llama"))
    with pytest.raises(EngineError, match="--dht-prefix"):
        resolve_dht_prefix(checkpoint)
    assert resolve_dht_prefix(checkpoint, "tiny-llama-hf") == "tiny-llama-hf"


def test_prefix_from_config_like_stock_petals(tiny_models):
    checkpoint = open_checkpoint(tiny_models.get("llama", dht_prefix="tiny-llama-hf"))
    assert resolve_dht_prefix(checkpoint) == "tiny-llama-hf"


@pytest.mark.parametrize("bad", ["has.dot", "has space", ""])
def test_invalid_explicit_prefix(tiny_models, bad, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models.get("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["dht_prefix"] = "from-config"
    (folder / "config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(folder)
    if bad:
        with pytest.raises(EngineError, match="invalid"):
            resolve_dht_prefix(checkpoint, bad)
    else:
        assert resolve_dht_prefix(checkpoint, bad) == "from-config"
