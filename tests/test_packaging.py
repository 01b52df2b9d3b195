"""The installers' recipes: what can be checked on this Linux machine without Windows or a Mac, and
(marked slow) the Linux bundle built for real, self-tested from its .tar.gz and from its .deb."""

from __future__ import annotations

import ast
import configparser
import json
import os
import plistlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from corolla.executable import corolla_command
from corolla.gui.launcher import WSL_DISTRO, node_command
from corolla.node.instance import is_node_command

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
SHELL_SCRIPTS = sorted(PACKAGING.rglob("*.sh"))


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(PACKAGING)))
def test_build_scripts_parse_and_are_executable(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("name", ["postinst", "prerm"])
def test_debian_maintainer_scripts_are_posix_sh(name):
    script = PACKAGING / "linux" / name
    assert script.read_text().startswith("#!/bin/sh") and os.access(script, os.X_OK)
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_desktop_entry_and_control_template():
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str
    entry.read(PACKAGING / "linux" / "corolla.desktop")
    desktop = entry["Desktop Entry"]
    assert desktop["Exec"] == "/opt/corolla/corolla app" and desktop["TryExec"] == "/opt/corolla/corolla"
    assert desktop["Icon"] == "corolla" and (ROOT / "resources" / "icons" / "corolla.png").exists()
    fields = dict(
        line.split(": ", 1) for line in (PACKAGING / "linux" / "control.in").read_text().splitlines() if ": " in line
    )
    assert {"Package", "Version", "Architecture", "Depends", "Description"} <= fields.keys()
    assert "libxcb-cursor0" in fields["Depends"] and "libgl1" in fields["Depends"]


def test_pyinstaller_spec_and_hooks_are_valid_python():
    for path in [PACKAGING / "corolla.spec", *PACKAGING.glob("hooks/*.py"), PACKAGING / "corolla_main.py"]:
        ast.parse(path.read_text(), filename=str(path))
    hook = (PACKAGING / "hooks" / "hook-hivemind.py").read_text()
    assert 'collect_submodules("hivemind")' in hook and "p2pd" in hook and '"pyz+py"' in hook
    main = (PACKAGING / "corolla_main.py").read_text()
    assert main.index("freeze_support()") < main.index("from corolla")


def test_macos_plists_parse():
    entitlements = plistlib.loads((PACKAGING / "macos" / "entitlements.plist").read_bytes())
    assert entitlements["com.apple.security.cs.allow-jit"] is True
    assert (ROOT / "resources" / "icons" / "corolla.icns").read_bytes()[:4] == b"icns"


def test_hosted_ci_workflow_is_valid_and_calls_scripts_that_exist():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "packages.yml").read_text())
    assert set(workflow["jobs"]) == {"linux", "macos", "windows"}
    runs = " ".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])
    scripts = set(re.findall(r"packaging/[\w/.-]+\.(?:sh|py)", runs))
    expected = {"packaging/build-linux.sh", "packaging/macos/build-macos.sh", "packaging/windows/build-windows.sh"}
    assert expected <= scripts
    assert all((ROOT / script).exists() for script in scripts), scripts


def _iss_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if re.fullmatch(r"\[\w+\]", line.strip()):
            current = sections.setdefault(line.strip()[1:-1], [])
        elif current is not None and line.strip() and not line.lstrip().startswith(";"):
            current.append(line)
    return sections


def test_inno_setup_script_structure_matches_the_window():
    text = (PACKAGING / "windows" / "corolla.iss").read_text()
    sections = _iss_sections(text)
    assert {"Setup", "Files", "Icons", "Registry", "Run", "UninstallRun", "Code"} <= sections.keys()
    code = "\n".join(sections["Code"]).lower()
    code = re.sub(r"'[^']*'", "''", re.sub(r"\{[^}]*\}", "", code))  # comments, then string literals out
    # Pascal blocks balance: each `begin` closes with one `end` (`end;`, `end else`).
    assert len(re.findall(r"\bbegin\b", code)) == len(re.findall(r"\bend\b", code)) > 0
    declared = re.findall(r"^(?:procedure|function)\s+(\w+)", code, re.M)
    assert {"wslready", "installdistro", "curstepchanged", "curuninstallstepchanged"} <= set(declared)
    # The distro, the Run value and the shortcuts agree with what the window itself does.
    assert f'#define Distro "{WSL_DISTRO}"' in text
    assert node_command("win32") == ["wsl.exe", "--distribution", WSL_DISTRO, "--exec", "corolla", "node"]
    assert 'ValueName: "Corolla"' in text and r"CurrentVersion\Run" in text
    assert 'Filename: "{app}\\Corolla.exe"; Parameters: "app"' in text
    assert "--import {#Distro}" in text and "--version 2" in text and "--unregister {#Distro}" in text
    for relative in ("LICENSE", "resources/icons/corolla.ico"):
        assert (ROOT / relative).exists()


def test_frozen_command_lines(monkeypatch):
    import sys

    assert corolla_command("node")[1:] == ["-m", "corolla.cli", "node"]
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert corolla_command("serve", "x") == [sys.executable, "serve", "x"]
    # Orphan reaping and `corolla uninstall` recognise the node in both forms, and nothing else.
    assert is_node_command(["/opt/corolla/corolla", "node"])
    assert is_node_command(["python3", "-m", "corolla.cli", "node"])
    assert not is_node_command(["/opt/corolla/corolla", "app"]) and not is_node_command(["python3", "tool.py", "node"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)")
@pytest.mark.timeout(1800)  # the build, then a self-test that converts SmolLM2 from scratch
def test_linux_packages_build_self_test_and_carry_the_same_bundle():
    result = subprocess.run(
        ["bash", str(PACKAGING / "build-linux.sh")], capture_output=True, text=True, timeout=2400, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.count("corolla self-test: passed") == 1, result.stderr[-3000:]
    assert "Paris" in result.stdout and ".deb payload equals the self-tested bundle and starts" in result.stdout
    built = json.loads((ROOT / "build" / "packages" / "build.json").read_text())
    assert Path(built["deb"]).exists() and Path(built["tarball"]).exists()
