"""A minimal Hugging Face hub on 127.0.0.1: serves one model folder under `/{repo}/resolve/{rev}/{file}`.

It answers the HEAD and GET requests huggingface_hub's `hf_hub_download` makes, checks the bearer
token when one is required, and records every request so tests can see what was downloaded.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repo_id: str
    folder: Path
    required_token: str | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, file, auth

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _serve(self, with_body: bool) -> None:
                prefix = f"/{hub.repo_id}/resolve/"
                auth = self.headers.get("Authorization")
                if not self.path.startswith(prefix):
                    self._error(404, "RepoNotFound")
                    return
                revision, _, filename = self.path[len(prefix) :].partition("/")
                hub.requests.append((self.command, filename, auth))
                if hub.required_token and auth != f"Bearer {hub.required_token}":
                    self._error(401, "RepoNotFound")  # the hub hides gated repos the same way
                    return
                path = hub.folder / filename
                if revision not in ("main", COMMIT) or not path.is_file() or ".." in filename:
                    self._error(404, "EntryNotFound")
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._serve(with_body=False)

            def do_GET(self):
                self._serve(with_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloaded_files(self) -> set[str]:
        return {filename for method, filename, _ in self.requests if method == "GET"}
