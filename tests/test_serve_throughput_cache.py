"""Where `corolla serve` keeps its throughput measurements: in Corolla's cache (COROLLA_HOME), keyed by
the model's absolute path, and only for a model whose blocks actually loaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from corolla.testing.swarm import LOOPBACK_FLAGS
from tests.support.procs import descendants, kill_all


def _serve(workdir, home, model: str, stats) -> subprocess.Popen:
    command = [sys.executable, "-m", "corolla.cli", "serve", model, "--new-swarm", *LOOPBACK_FLAGS]
    command += ["--dht-prefix", "tiny-tp", "--blocks", "0:6", "--torch-dtype", "float32", "--num-threads", "1"]
    command += ["--stats-file", str(stats)]
    env = {**os.environ, "COROLLA_HOME": str(home), "XDG_CACHE_HOME": str(workdir / "xdg-cache")}
    log = open(workdir / f"{os.path.basename(model)}.log", "wb")  # noqa: SIM115  (the child owns it)
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_measurements_go_to_corolla_home_keyed_absolutely_and_never_for_a_failed_load(tiny_models, tmp_path):
    home = tmp_path / "home"
    cache = home / "cache" / "throughput.json"
    source = tiny_models.get("llama")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a block that cannot load

    failed = _serve(tmp_path, home, "./broken", tmp_path / "broken.stats.json")
    try:
        assert failed.wait(180) != 0
    finally:
        kill_all(descendants(failed.pid))
    entries = json.loads(cache.read_text()) if cache.exists() else {}
    assert not [key for key in entries if "broken" in key], entries

    shutil.copytree(source, tmp_path / "good")
    stats = tmp_path / "good.stats.json"
    server = _serve(tmp_path, home, "./good", stats)
    tree = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            if stats.exists() and json.loads(stats.read_text() or "{}").get("state") == "online":
                break
            time.sleep(0.5)
        tree = descendants(server.pid)
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        kill_all(tree)
    entries = json.loads(cache.read_text())
    absolute = str((tmp_path / "good").resolve()).replace("/", "--")
    assert [key for key in entries if absolute in key], entries
    assert not [key for key in entries if "./" in key or "broken" in key], entries
    assert not (tmp_path / "xdg-cache" / "corolla").exists()  # nothing outside COROLLA_HOME
