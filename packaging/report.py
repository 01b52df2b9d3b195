"""Report on the built Linux packages as JSON: bundle and package sizes, build time, the bundled
window's cold start (launch to first painted frame, against a running node), and the self-test time.

Usage: .venv/bin/python packaging/report.py [BUNDLE_DIR]   (after packaging/build-linux.sh)
Run it as root in `unshare -n` for a loopback-only network, as the tests do.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ROOT / "build" / "packages"


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.2)
    return False


def window_cold_start(executable: Path, runs: int = 3) -> dict:
    """Seconds from launching `corolla app` to its first painted frame, with the node already up."""
    with tempfile.TemporaryDirectory(prefix="corolla-report-") as home:
        env = {**os.environ, "COROLLA_HOME": home, "QT_QPA_PLATFORM": "offscreen"}
        node = subprocess.Popen(
            [str(executable), "node"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            if not wait_for(Path(home) / "config" / "node.json", 120):
                return {"error": "the bundled node did not start"}
            (Path(home) / "config" / "app-first-run-done").write_text("1")  # no first-run dialog
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                result = subprocess.run(
                    [str(executable), "app"],
                    env={**env, "COROLLA_APP_EXIT_AFTER_PAINT": "1"},
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                if "first paint" not in result.stdout:
                    return {"error": f"the window did not paint: {result.stderr[-500:]}"}
                times.append(time.perf_counter() - started)
        finally:
            node.terminate()
            node.wait(timeout=60)
    return {"median_s": round(statistics.median(times), 3), "runs": [round(t, 3) for t in times]}


def self_test_seconds(executable: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run([str(executable), "--self-test"], capture_output=True, text=True, timeout=600, check=False)
    return {"seconds": round(time.perf_counter() - started, 1), "passed": result.returncode == 0}


def main() -> int:
    bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "dist" / "corolla"
    executable = bundle / "corolla"
    if not executable.exists():
        print(f"no bundle at {bundle}: run packaging/build-linux.sh first", file=sys.stderr)
        return 1
    build = json.loads((PACKAGES / "build.json").read_text()) if (PACKAGES / "build.json").exists() else {}
    report = {
        "bundle_mb": round(folder_bytes(bundle) / 2**20, 1),
        "packages_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(PACKAGES.glob("*")) if p.is_file()},
        "build_seconds": build.get("build_seconds"),
        "window_cold_start": window_cold_start(executable),
        "self_test": self_test_seconds(executable),
    }
    print(json.dumps(report, indent=2))
    return 0 if report["self_test"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
