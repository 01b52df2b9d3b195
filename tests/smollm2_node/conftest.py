"""One `corolla node` serving the real default model (SmolLM2-135M-Instruct) for the whole package:
the node API tests and the window's chat pane ask the same node, which starts once (its cache already
holds the session's converted folder, so the node reuses it instead of converting)."""

from __future__ import annotations

import pytest

from corolla.testing.node import NodeProcess, home_with_converted_model


@pytest.fixture(scope="package")
def node(smollm2, tmp_path_factory):
    home = home_with_converted_model(tmp_path_factory.mktemp("smollm2-node"), smollm2)
    process = NodeProcess(home, extra_env={"COROLLA_DEFAULT_MODEL": "smollm2"})
    try:
        process.wait_contribution("online", timeout=300)
    except BaseException:
        process.stop()
        raise
    yield process
    process.stop()
