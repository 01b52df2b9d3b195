"""scripts/run-app.sh's check of the system libraries Qt needs (no window, no node)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QT_LIBS = ROOT / "scripts" / "qt-libs.sh"
RUNS = 40


def _check(path_prefix: str = "") -> list[str]:
    """Run missing_qt_packages RUNS times under run-app.sh's `set -euo pipefail`; every run's answer."""
    script = f"""
set -euo pipefail
{path_prefix}
source {QT_LIBS}
for _ in $(seq {RUNS}); do echo "[$(missing_qt_packages)]"; done
"""
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_installed_qt_libraries_are_found_on_every_run(tmp_path):
    """A linker cache far larger than a pipe's buffer with every library on its first lines: `ldconfig -p |
    grep -q` under pipefail then failed with SIGPIPE (141) and named installed libraries as missing."""
    names = subprocess.run(
        ["bash", "-c", f"source {QT_LIBS}; printf '%s\\n' \"${{QT_XCB_LIBS[@]}}\""],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    fake = tmp_path / "bin" / "ldconfig"
    fake.parent.mkdir()
    listing = "".join(f"\t{entry.split(':')[0]} (libc6,x86-64) => /usr/lib/{entry.split(':')[0]}\n" for entry in names)
    filler = "\tlibfiller.so.1 (libc6,x86-64) => /usr/lib/libfiller.so.1\n" * 40_000  # about 2.4 MB
    (tmp_path / "listing").write_text(f"{len(names)} libs found in cache `/etc/ld.so.cache'\n{listing}{filler}")
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'listing'}\n")
    fake.chmod(0o755)
    answers = _check(f'export PATH="{fake.parent}:$PATH"')
    assert answers == ["[]"] * RUNS


def test_a_missing_library_is_named_on_every_run(tmp_path):
    fake = tmp_path / "bin" / "ldconfig"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '\tlibEGL.so.1 (libc6,x86-64) => /usr/lib/libEGL.so.1'\n")
    fake.chmod(0o755)
    answers = set(_check(f'export PATH="{fake.parent}:$PATH"'))
    assert len(answers) == 1
    missing = answers.pop().strip("[]").split()
    assert "libegl1" not in missing and "libxcb-cursor0" in missing and len(missing) == 11


def test_the_real_linker_cache_gives_the_same_answer_every_time():
    listing = subprocess.run(
        ["bash", "-c", "PATH=$PATH:/sbin:/usr/sbin ldconfig -p"], capture_output=True, text=True, check=True
    ).stdout
    entries = subprocess.run(
        ["bash", "-c", f"source {QT_LIBS}; printf '%s\\n' \"${{QT_XCB_LIBS[@]}}\""],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    expected = [entry.split(":")[1] for entry in entries if entry.split(":")[0] not in listing]
    assert _check() == [f"[{' '.join(expected)}]"] * RUNS
