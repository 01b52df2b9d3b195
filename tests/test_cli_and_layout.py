"""The `corolla` command line in a real subprocess, and the package's import rules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import corolla
from corolla.testing.node import NodeProcess

APP = Path(corolla.__file__).parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corolla.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"corolla {corolla.__version__}"


def test_make_tiny_info_and_generate(tmp_path):
    folder = tmp_path / "tiny"
    assert run_cli("model", "make-tiny", "qwen2", str(folder), "--layers", "4").returncode == 0
    info = run_cli("model", "info", str(folder), "--json", "--dht-prefix", "tiny-qwen")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["family"] == "qwen" and data["num_blocks"] == 4 and data["dht_prefix"] == "tiny-qwen"
    assert data["bytes_per_block"] > 0 and data["total_bytes"] > 4 * data["bytes_per_block"]
    generated = run_cli("model", "generate", str(folder), "--prompt", "hello", "--max-new-tokens", "5", "--spans", "2")
    assert generated.returncode == 0, generated.stderr
    assert re.search(r"-- \d+ tokens in .* through spans \[0:2\), \[2:4\)", generated.stderr)


def test_bad_input_is_a_one_line_error(tmp_path):
    result = run_cli("model", "info", str(tmp_path / "no" / "such" / "model"))
    assert result.returncode == 2
    assert result.stderr.startswith("corolla: error:")
    assert "Traceback" not in result.stderr


def _imports(package: Path) -> list[tuple[Path, str]]:
    found = []
    for path in package.rglob("*.py"):
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(?:from|import)\s+([\w.]+)", line)
            if match:
                found.append((path, match.group(1)))
    return found


def test_swarm_never_imports_qt_http_node_or_gui():
    forbidden = ("PySide6", "fastapi", "uvicorn", "starlette", "corolla.node", "corolla.gui")
    bad = [(p, m) for p, m in _imports(APP / "swarm") if m.startswith(forbidden)]
    assert not bad


def test_gui_never_imports_torch_hivemind_or_swarm():
    gui = APP / "gui"
    if not gui.exists():
        return
    forbidden = ("torch", "hivemind", "transformers", "corolla.swarm")
    assert not [(p, m) for p, m in _imports(gui) if m.startswith(forbidden)]


def test_starting_the_cli_or_the_window_never_loads_torch(tmp_path):
    # Every `corolla` start builds the parser, the window's included: torch would cost seconds there.
    probe = (
        "import sys; from corolla.cli import main; main(['status']); import corolla.gui.app; "
        "print(sorted(m for m in ('torch', 'hivemind', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "COROLLA_HOME": str(tmp_path)}  # no node there: `status` says so and returns
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True, env=env
    )
    assert result.stdout.strip() == "[]", result.stdout
    bad = run_cli("model", "make-tiny", "no-such-family", "/tmp/never-written")
    assert bad.returncode == 2 and "choose one of" in bad.stderr and "llama" in bad.stderr


def test_no_pickle_or_remote_code():
    text = "\n".join(p.read_text() for p in APP.rglob("*.py"))
    assert "trust_remote_code=True" not in text
    assert "pickle.load" not in text and "torch.load(" not in text


@pytest.mark.slow
def test_self_test_runs_everything_and_leaves_nothing(tmp_path):
    # It converts SmolLM2 from scratch in a fresh home (about a minute or two here) and must answer right.
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "--self-test"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "self-test: passed" in result.stderr and "(this computer)" in result.stdout
    assert "Paris" in result.stdout and "Apache-2.0" in result.stdout
    assert list(tmp_path.glob("corolla-self-test-*")) == []


def test_uninstall_stops_the_node_drops_the_login_entry_and_only_asked_for_user_data(tmp_path):
    env = {**os.environ, "COROLLA_HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    command = [sys.executable, "-m", "corolla.cli"]
    node = NodeProcess(tmp_path / "home", extra_env={"XDG_CONFIG_HOME": env["XDG_CONFIG_HOME"]})
    try:
        entry = tmp_path / "xdg" / "autostart" / "corolla.desktop"
        enable = "from corolla.gui import autostart; autostart.set_enabled(True)"
        subprocess.run([sys.executable, "-c", enable], env=env, check=True, timeout=60)
        assert entry.exists()

        kept = subprocess.run([*command, "uninstall"], env=env, capture_output=True, text=True, timeout=120)
        assert kept.returncode == 0, kept.stderr
        assert "stopped the running node" in kept.stdout and "start-at-login" in kept.stdout
        assert node.process.wait(timeout=30) is not None and not entry.exists()
        assert (tmp_path / "home" / "data").is_dir()  # user data stays unless asked for

        refused = subprocess.run(
            [*command, "uninstall", "--user-data"], env=env, input="n\n", capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1 and (tmp_path / "home" / "data").is_dir()
        cleared = subprocess.run(
            [*command, "uninstall", "--user-data", "--yes"], env=env, capture_output=True, text=True, timeout=60
        )
        assert cleared.returncode == 0, cleared.stderr
        assert not (tmp_path / "home" / "data").exists() and not (tmp_path / "home" / "config").exists()
    finally:
        node.stop()
