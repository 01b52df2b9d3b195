"""Loading by repo id through huggingface_hub, against a hub served on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import torch

from corolla.swarm.models import CheckpointError, LoadOptions, load_client_parts, load_span, open_checkpoint
from tests.support.fake_hub import FakeHub

REPO = "corolla-test/tiny-llama"
TOKEN = "hf_test_token_123"


@pytest.fixture
def hub(tiny_models):
    hub = FakeHub(REPO, tiny_models.get("llama"), required_token=TOKEN)
    url = hub.start()
    yield hub, url
    hub.stop()


def test_span_downloads_only_config_index_and_its_shards(hub, tmp_path):
    fake, url = hub
    options = LoadOptions(token=TOKEN, cache_dir=str(tmp_path / "cache"), endpoint=url)
    span = load_span(REPO, 4, 6, options)
    weight_map = json.loads((fake.folder / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {shard for name, shard in weight_map.items() if ".layers.4." in name or ".layers.5." in name}
    downloaded = fake.downloaded_files()
    assert downloaded == {"config.json", "model.safetensors.index.json", *needed}
    assert len(set(weight_map.values()) - needed) >= 4  # the other shards stayed on the hub
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in fake.requests)
    assert not any(p.is_meta for p in span.layers.parameters())

    local = load_span(fake.folder, 4, 6)
    hidden = torch.randn(1, 3, 64)
    assert torch.equal(span(hidden), local(hidden))


def test_client_parts_and_tokenizer_from_hub(hub, tmp_path):
    from transformers import AutoTokenizer

    fake, url = hub
    options = LoadOptions(token=TOKEN, cache_dir=str(tmp_path / "cache"), endpoint=url)
    checkpoint = open_checkpoint(REPO, token=TOKEN, cache_dir=options.cache_dir, endpoint=url)
    load_client_parts(checkpoint, options)
    assert not any(".layers." in name for name in checkpoint.client_tensor_names())
    downloaded_shards = {f for f in fake.downloaded_files() if f.endswith(".safetensors")}
    assert downloaded_shards == set(checkpoint.shards_for(checkpoint.client_tensor_names()))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint.fetch_tokenizer_files()))
    assert tokenizer.chat_template


def test_gated_repo_without_token_says_so(hub, tmp_path):
    _, url = hub
    with pytest.raises(CheckpointError, match="token"):
        open_checkpoint(REPO, cache_dir=str(tmp_path / "cache"), endpoint=url)


def test_unreachable_hub_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"could not reach the hub for config\.json"):
        open_checkpoint(REPO, cache_dir=str(tmp_path / "cache"), endpoint="http://127.0.0.1:9")
