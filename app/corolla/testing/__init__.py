"""The test harness: real processes on loopback or in the network lab, shared by the tests, the
benchmarks and scripts/screenshots.py (import it as `corolla.testing`; nothing edits sys.path). Not part
of the app: the bundle leaves it out (packaging/corolla.spec).

- swarm.py: tiny reference models, Corolla block servers and chains, stock Petals servers from the
  reference environment, process groups that stop cleanly.
- node.py: a `corolla node` in a temporary home, its API client and the SSE reader.
- wire.py: a raw Petals wire client (hand-built RPC requests) for protocol and attack tests.
- hostile.py: peers that misbehave on purpose (DHT floods, malformed frames) for the adversarial tests.
- netlab.py: the network lab (namespaces, NAT routers, netem delays); lab_swarm.py: swarms inside it;
  lab_client.py: the client script a lab host runs (LAB_CLIENT).
"""

from pathlib import Path

LAB_CLIENT = Path(__file__).with_name("lab_client.py")
