"""A real `corolla node` process for tests, with its own COROLLA_HOME, talked to over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from corolla.api.sse import json_events
from corolla.testing.swarm import ProcessFailed, _stop_group


class NodeProcess:
    def __init__(self, home: Path, extra_env: dict[str, str] | None = None, name: str = "node"):
        self.home = Path(home)
        self.log_path = self.home / f"{name}.log"
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "COROLLA_HOME": str(self.home), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "corolla.cli", "node"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self.url, self.token = self._wait_ready()
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)

    def _wait_ready(self, timeout: float = 60.0) -> tuple[str, str]:
        lock = self.home / "config" / "node.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ProcessFailed(f"node exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                data = json.loads(lock.read_text())
                if data["pid"] == self.process.pid:
                    token = Path(data["token_file"]).read_text().strip()
                    if httpx.get(f"{data['url']}/api/ping", timeout=2).status_code == 200:
                        return data["url"], token
            except (FileNotFoundError, json.JSONDecodeError, KeyError, httpx.HTTPError):
                pass
            time.sleep(0.2)
        raise ProcessFailed(f"node did not start in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def put(self, path: str, **kwargs) -> httpx.Response:
        return self.client.put(path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def patch(self, path: str, **kwargs) -> httpx.Response:
        return self.client.patch(path, **kwargs)

    def delete(self, path: str, **kwargs) -> httpx.Response:
        return self.client.delete(path, **kwargs)

    def status(self) -> dict:
        response = self.get("/api/status")
        response.raise_for_status()
        return response.json()

    def wait_contribution(self, state: str, timeout: float = 120.0, predicate=None) -> dict:
        deadline = time.monotonic() + timeout
        status = {}
        while time.monotonic() < deadline:
            status = self.status()
            if status["contribution"]["state"] == state and (predicate is None or predicate(status)):
                return status
            time.sleep(0.5)
        raise ProcessFailed(f"contribution never reached {state!r}: {status}\n{self.log_tail()}")

    @contextlib.contextmanager
    def chat_streaming(
        self, content: str, max_new_tokens: int, tokens: int = 1, timeout: float = 300.0
    ) -> Iterator[dict]:
        """A chat reply under way on a thread, through the window's API: the body runs once `tokens` of its
        tokens arrived (or it ended early); after the block, the dict's "events" holds all of the reply's."""
        got: dict = {"events": []}
        streaming = threading.Event()

        def chat() -> None:
            try:
                chat = self.post("/api/chats", json={"title": content[:40]}).json()
                body = {"content": content, "max_new_tokens": max_new_tokens}
                with self.client.stream("POST", f"/api/chats/{chat['id']}/messages", json=body) as response:
                    for event in sse_events(response):
                        got["events"].append(event)
                        if sum(e[0] == "token" for e in got["events"]) >= tokens:
                            streaming.set()
            finally:
                streaming.set()

        thread = threading.Thread(target=chat, daemon=True)
        thread.start()
        try:
            if not streaming.wait(timeout):
                raise AssertionError(f"no reply streamed within {timeout:.0f} s")
            yield got
        finally:
            thread.join(timeout)

    def maps_torch(self) -> bool:
        """Whether torch's library is mapped into the node process (it imported torch at some point)."""
        with open(f"/proc/{self.process.pid}/maps") as maps:
            return "libtorch" in maps.read()

    def stop(self) -> int:
        self.client.close()
        code = _stop_group(self.process, signal.SIGTERM, 40)
        self._kill_leftover_server()
        return code

    def _kill_leftover_server(self) -> None:
        """The node stops its block server; if a test killed the node, make sure nothing outlives it."""
        try:
            pid = int((self.home / "data" / "server" / "server.pid").read_text())
            os.killpg(pid, signal.SIGKILL)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        self.client.close()
        os.kill(self.process.pid, signal.SIGKILL)  # the node only: its block server child is left behind
        self.process.wait(10)


@contextlib.contextmanager
def contributing_node(home: Path, name: str = "node") -> Iterator[NodeProcess]:
    """A node started in `home` with its contribution online; stopped afterwards, also if it never was."""
    process = NodeProcess(home, name=name)
    try:
        process.wait_contribution("online")
        yield process
    finally:
        process.stop()


def sse_events(response: httpx.Response):
    """Parse a server-sent event stream into (event, data) pairs as they arrive (the app's own parser)."""
    return json_events(response.iter_lines())


def home_with_converted_model(home: Path, smollm2: Path) -> Path:
    """A user cache that already holds the converted SmolLM2 (hard links: no copy, no conversion)."""
    target = home / "cache" / "models" / "SmolLM2-135M-Instruct-Q4_1"
    target.parent.mkdir(parents=True)
    try:
        shutil.copytree(smollm2, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(smollm2, target)
    return home
