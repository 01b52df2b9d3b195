"""A schema-driven fuzz of the node's API (schemathesis + hypothesis): no request may cause a 5xx.

The node here does not contribute (so the swarm-facing calls answer quickly with a 409 that says
why) and runs with the hub offline. Shutdown, settings changes and contribution control are left out:
they are exercised by test_node.py and would change the node under the fuzzer's feet.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from corolla.testing.node import NodeProcess

pytestmark = pytest.mark.slow
EXCLUDED = r"^/api/(shutdown|contribution/.*|settings.*)$"


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-home")
    process = NodeProcess(home, extra_env={"HF_HUB_OFFLINE": "1"}, name="fuzz")
    assert process.post("/api/contribution/stop").status_code == 200
    yield process
    process.stop()


def test_no_request_causes_a_server_error(fuzz_node):
    headers = {"Authorization": f"Bearer {fuzz_node.token}"}
    schema = schemathesis.openapi.from_url(f"{fuzz_node.url}/openapi.json", headers=headers).exclude(
        path_regex=EXCLUDED
    )
    failures, calls = [], 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12  # status, hardware, swarm, stats, chats..., /v1/...
    for operation in operations:

        @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            nonlocal calls
            calls += 1
            response = case.call(headers=headers, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

        fuzz()
    assert calls >= 10 * len(operations) // 2
    assert not failures, "\n".join(failures[:10])
