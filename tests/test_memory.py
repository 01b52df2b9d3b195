"""corolla.memory: hivemind imported without its package __init__, and freed heap pages given back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(APP)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_hivemind_without_its_init_still_answers_every_name():
    out = _run(
        """
        import sys
        from corolla.memory import import_hivemind_lightly

        assert import_hivemind_lightly()
        assert not import_hivemind_lightly()  # once is enough
        import corolla.swarm.peers  # what the node and the server use of hivemind
        from hivemind import dht  # a submodule asked of the package: only that one
        unused = [m for m in ("hivemind.averaging", "hivemind.moe", "hivemind.optim") if m in sys.modules]
        print("unused after the submodules:", unused)
        import hivemind

        assert hivemind.DHT is dht.DHT  # a name of the package's own __init__: it runs then
        print("version", hivemind.__version__, "moe", "hivemind.moe" in sys.modules)
        try:
            hivemind.no_such_name
        except AttributeError:
            print("AttributeError")
        """
    )
    assert "unused after the submodules: []" in out
    assert "moe True" in out and "AttributeError" in out


def test_hivemind_without_its_init_imports_after_qt():
    """PySide's import hook looks at every module imported after Qt (inspect.unwrap asks for `__wrapped__`),
    as in the frozen app, where the node shares the bundle with the window: a dunder asked of the light
    package loaded the full __init__ in the middle of importing hivemind.p2p (a circular import)."""
    out = _run(
        """
        import PySide6.QtCore  # its import hook, active from here on
        from corolla.memory import import_hivemind_lightly

        assert import_hivemind_lightly()
        from hivemind.p2p import P2P  # what node/sharing.py imports first
        import corolla.swarm.peers
        import sys
        print("full init:", "hivemind.averaging" in sys.modules, P2P.__name__)
        """
    )
    assert "full init: False P2P" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_trimming_gives_freed_heap_pages_back():
    out = _run(
        """
        import psutil
        from corolla.memory import start_trimming, trim_malloc

        me = psutil.Process()
        blocks, pins = [], []
        for _ in range(400):  # 100 kB blocks come from the heap; the pins between them keep it from shrinking
            blocks.append(bytes(bytearray(100_000)))
            pins.append(bytes(bytearray(1000)))
        del blocks
        freed = me.memory_info().rss
        assert trim_malloc()
        print("given back MB", (freed - me.memory_info().rss) / 1e6)
        thread = start_trimming(every_s=0.05)
        print("thread", thread.name, thread.daemon, thread.is_alive())
        """
    )
    given_back = float(out.split("given back MB")[1].split()[0])
    assert given_back > 20, out  # of the 40 MB freed
    assert "thread corolla-malloc-trim True True" in out
