"""A model checkpoint, local or on the Hugging Face hub, read one tensor group at a time.

Only safetensors are read (never pickle). For a hub repo, files are fetched through huggingface_hub
one by one, so a span downloads the config, the index and just the shards that hold its tensors.
Every shard opened is recorded in `opened_shards`, which the loader's tests check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from corolla.swarm.models.errors import CheckpointError, EngineError
from corolla.swarm.models.family import ModelFamily, block_index_of, family_for

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# An index bigger than this is not a real index (a 405B model's is ~100 KB).
MAX_INDEX_BYTES = 64 * 1024 * 1024


class FileResolver(Protocol):
    """Turns a file name inside the checkpoint into a local path (downloading it if needed)."""

    def local_path(self, filename: str) -> Path | None:
        """The file's local path, or None if the checkpoint has no such file."""
        ...

    def describe(self) -> str: ...


@dataclass
class LocalFolder:
    folder: Path

    def local_path(self, filename: str) -> Path | None:
        path = self.folder / filename
        return path if path.is_file() else None

    def describe(self) -> str:
        return f"folder {self.folder}"


@dataclass
class HubRepo:
    """A repo on the hub (or any endpoint huggingface_hub is pointed at with HF_ENDPOINT)."""

    repo_id: str
    revision: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    endpoint: str | None = None  # a hub mirror; None: huggingface_hub's default (or HF_ENDPOINT)

    def local_path(self, filename: str) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            path = hf_hub_download(
                self.repo_id,
                filename,
                revision=self.revision,
                token=self.token,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
            )
        except HFValidationError as exc:
            raise CheckpointError(f"{self.repo_id!r} is not a valid Hugging Face repo id: {exc}") from exc
        except LocalEntryNotFoundError as exc:  # before EntryNotFoundError: it is a subclass
            raise CheckpointError(
                f"could not reach the hub for {filename} of {self.describe()}, and it is not in the local cache: {exc}"
            ) from exc
        except EntryNotFoundError:
            return None
        except RepositoryNotFoundError as exc:
            raise CheckpointError(
                f"{self.describe()} was not found, or it is gated and needs a Hugging Face token: {exc}"
            ) from exc
        except OSError as exc:  # network errors and HTTP errors are OSErrors in huggingface_hub
            raise CheckpointError(f"could not download {filename} from {self.describe()}: {exc}") from exc
        return Path(path)

    def describe(self) -> str:
        return f"hub repo {self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def looks_like_local_folder(name_or_path: str | os.PathLike) -> bool:
    try:
        return Path(name_or_path).is_dir()
    except (ValueError, OSError):  # e.g. an embedded NUL byte or a name too long for the file system
        return False


class Checkpoint:
    """A model's config and weight layout; tensors are read on demand from the shards that hold them."""

    def __init__(self, resolver: FileResolver, source_name: str, is_local: bool):
        self.resolver = resolver
        self.source_name = source_name
        self.is_local = is_local
        self.opened_shards: list[str] = []
        self.raw_config = self._read_config()
        # Fails at once, before any weights are fetched, for an architecture without an adapter.
        self.family: ModelFamily = family_for(self.raw_config.get("model_type"))
        self.config = self._build_config()
        self.weight_map = self._read_weight_map()

    # --- construction --------------------------------------------------------------------------
    def _required(self, filename: str) -> Path:
        path = self.resolver.local_path(filename)
        if path is None:
            raise CheckpointError(f"{self.resolver.describe()} has no {filename}")
        return path

    def _read_json(self, path: Path) -> dict:
        try:
            if path.stat().st_size > MAX_INDEX_BYTES:
                raise CheckpointError(f"{path.name} is implausibly large ({path.stat().st_size} bytes)")
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path.name} in {self.resolver.describe()} is unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path.name} in {self.resolver.describe()} is not a JSON object")
        return data

    def _read_config(self) -> dict:
        return self._read_json(self._required(CONFIG_FILE))

    def _build_config(self):
        from transformers import AutoConfig

        config_dir = self._required(CONFIG_FILE).parent
        try:
            config = AutoConfig.from_pretrained(str(config_dir), trust_remote_code=False)
        except (ValueError, OSError, TypeError) as exc:
            raise CheckpointError(f"config.json of {self.resolver.describe()} is invalid: {exc}") from exc
        config._attn_implementation = self.family.attn_implementation
        return config

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self.resolver.local_path(SAFETENSORS_INDEX)
        if index_path is not None:
            weight_map = self._read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and "/" not in v and ".." not in v
                for k, v in weight_map.items()
            ):
                raise CheckpointError(f"{SAFETENSORS_INDEX} of {self.resolver.describe()} has no valid weight_map")
            return weight_map
        single = self.resolver.local_path(SAFETENSORS_SINGLE)
        if single is not None:
            return dict.fromkeys(self._shard_keys(SAFETENSORS_SINGLE, single), SAFETENSORS_SINGLE)
        if any(self.resolver.local_path(name) is not None for name in PICKLE_WEIGHTS):
            raise CheckpointError(
                f"{self.resolver.describe()} has only pytorch_model.bin weights; Corolla loads safetensors only "
                "(pickle files can run code)"
            )
        raise CheckpointError(f"{self.resolver.describe()} has no safetensors weights")

    # --- layout --------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    def block_tensor_names(self, start: int, end: int) -> list[str]:
        return [n for n in self.weight_map if (i := block_index_of(n)) is not None and start <= i < end]

    def client_tensor_names(self) -> list[str]:
        return [n for n in self.weight_map if block_index_of(n) is None]

    def shards_for(self, tensor_names: Iterable[str]) -> list[str]:
        return sorted({self.weight_map[name] for name in tensor_names})

    # --- reading -------------------------------------------------------------------------------
    def _shard_keys(self, shard: str, path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"shard {shard} of {self.resolver.describe()} is corrupt: {exc}") from exc

    def read_tensors(self, tensor_names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, opening each shard that holds some of them exactly once."""
        by_shard: dict[str, list[str]] = {}
        for name in tensor_names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, names in sorted(by_shard.items()):
            path = self.resolver.local_path(shard)
            if path is None:
                raise CheckpointError(
                    f"shard {shard} is listed in the index but missing from {self.resolver.describe()}"
                )
            self.opened_shards.append(shard)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    present = set(handle.keys())
                    for name in names:
                        if name not in present:
                            raise CheckpointError(f"shard {shard} lacks tensor {name} that the index places there")
                        tensors[name] = handle.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"shard {shard} of {self.resolver.describe()} is corrupt: {exc}") from exc
        return tensors

    def fetch_tokenizer_files(self) -> Path:
        """Make the tokenizer files local; returns the folder AutoTokenizer can load from."""
        folder = None
        for name in TOKENIZER_FILES:
            path = self.resolver.local_path(name)
            if path is not None:
                folder = path.parent
        if folder is None:
            raise CheckpointError(f"{self.resolver.describe()} has no tokenizer files")
        return folder


def open_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    token: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    endpoint: str | None = None,
) -> Checkpoint:
    """Open a local folder, or a hub repo id (fetching only its config and index for now)."""
    if looks_like_local_folder(name_or_path):
        return Checkpoint(LocalFolder(Path(name_or_path)), str(name_or_path), is_local=True)
    name = str(name_or_path)
    if os.sep in name and (name.startswith((".", os.sep)) or name.count("/") > 1):
        raise EngineError(f"{name} is neither a folder on this computer nor a Hugging Face repo id")
    repo = HubRepo(name, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint)
    return Checkpoint(repo, name, is_local=False)
