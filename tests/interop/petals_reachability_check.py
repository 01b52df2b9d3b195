"""Runs in the stock Petals 2.2 reference venv: Petals' own direct-reachability check against a swarm.

Usage: python petals_reachability_check.py INITIAL_PEER...
Prints one JSON line: {"reachable": true|false|null} (what `petals.cli.run_server` would decide).
"""

import json
import sys

import petalsref_nonat  # noqa: F401
from petals.server.reachability import check_direct_reachability


def main():
    result = check_direct_reachability(
        initial_peers=sys.argv[1:], use_relay=False, host_maddrs=["/ip4/0.0.0.0/tcp/0"], startup_timeout=60
    )
    print(json.dumps({"reachable": result}), flush=True)


if __name__ == "__main__":
    main()
