"""Where the node keeps its files: the platform's user dirs, or one folder given by COROLLA_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodePaths:
    config_dir: Path
    data_dir: Path
    cache_dir: Path

    @classmethod
    def default(cls) -> NodePaths:
        home = os.environ.get("COROLLA_HOME")
        if home:
            root = Path(home)
            return cls(root / "config", root / "data", root / "cache")
        import platformdirs

        return cls(
            Path(platformdirs.user_config_dir("corolla")),
            Path(platformdirs.user_data_dir("corolla")),
            Path(platformdirs.user_cache_dir("corolla")),
        )

    def ensure(self) -> NodePaths:
        for folder in (self.config_dir, self.data_dir, self.cache_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self

    @property
    def lock_file(self) -> Path:
        return self.config_dir / "node.json"

    @property
    def token_file(self) -> Path:
        return self.config_dir / "api-token"

    @property
    def database(self) -> Path:
        return self.data_dir / "corolla.sqlite3"

    @property
    def server_dir(self) -> Path:
        return self.data_dir / "server"

    @property
    def demo_model(self) -> Path:
        return self.data_dir / "demo-model"
