"""The tray icon for real: the app under Xvfb with Debian's `trayer` as the system tray host, driven
with xdotool as a person would (click the icon, pick menu entries), against a real node."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("PySide6")
pytestmark = pytest.mark.slow
TOOLS = ("Xvfb", "trayer", "xdotool")
if any(shutil.which(tool) is None for tool in TOOLS):
    pytest.skip(
        "needs Debian's xvfb, trayer and xdotool (apt-get install xvfb trayer xdotool)", allow_module_level=True
    )

from corolla.testing.node import NodeProcess  # noqa: E402


class Desktop:
    """Xvfb plus trayer; xdotool commands on that display."""

    def __init__(self, home: Path):
        self.processes: list[subprocess.Popen] = []
        # Xvfb picks a free display itself and writes its number to the pipe once it accepts clients
        # (choosing one here raced with other X servers on the machine).
        read_end, write_end = os.pipe()
        self.processes.append(
            subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                pass_fds=(write_end,),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        os.close(write_end)
        with os.fdopen(read_end) as numbers:
            number = numbers.readline().strip()
        assert number.isdigit(), "Xvfb did not start"
        self.display = f":{number}"
        self.env = {**os.environ, "DISPLAY": self.display}
        self.wait(lambda: self.xdotool("getdisplaygeometry", check=False).returncode == 0, 20, "Xvfb did not start")
        self.log = home / "desktop.log"
        try:
            placement = ["--edge", "top", "--align", "left", "--widthtype", "request", "--height", "32"]
            looks = ["--SetDockType", "true", "--transparent", "false", "--tint", "0xffffff", "--expand", "false"]
            trayer = self._start(["trayer", *placement, *looks], log=self.log)
            self.wait(
                lambda: trayer.poll() is not None or self.windows("--class", "trayer"), 60, "trayer did not start"
            )
            assert trayer.poll() is None, f"trayer exited: {self.log.read_text(errors='replace')}"
        except BaseException:
            self.close()  # never leave an X server behind
            raise

    def _start(self, command: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(
            command, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def xdotool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True, timeout=20, check=check)

    def windows(self, *query: str) -> list[str]:
        return self.xdotool("search", *query, check=False).stdout.split()

    @staticmethod
    def wait(predicate, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(message)

    def tray_colour(self) -> str | None:
        """Which state's petal colour fills the tray corner of the screen (read back from the X server)."""
        code = (
            "from PySide6.QtGui import QGuiApplication, QColor; app = QGuiApplication([]); "
            "image = app.primaryScreen().grabWindow(0, 0, 0, 48, 32).toImage(); "
            "pixels = [image.pixelColor(x, y) for x in range(48) for y in range(32)]; "
            "near = lambda c, h: abs(c.red() - int(h[1:3], 16)) + abs(c.green() - int(h[3:5], 16)) "
            "+ abs(c.blue() - int(h[5:7], 16)) < 40; "
            "print(sum(near(p, '#e0707a') for p in pixels), sum(near(p, '#e0a526') for p in pixels))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**self.env, "QT_QPA_PLATFORM": "xcb"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.split()
        if len(out) != 2:
            return None
        pink, amber = int(out[0]), int(out[1])
        return "contributing" if pink > 30 and pink > amber else "paused" if amber > 30 else None

    def close(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    home = tmp_path_factory.mktemp("tray-node")
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "app-first-run-done").write_text("1")  # the welcome dialog has its own tests
    process = NodeProcess(home, name="tray-node")
    process.wait_contribution("online")
    yield process
    process.stop()


def _state(node: NodeProcess) -> str | None:
    """The node's contribution state; None when one poll fails (the node's forked DHT process can hold
    a kept-alive connection the node has closed, and the test's client then sees a reset)."""
    try:
        return node.status()["contribution"]["state"]
    except httpx.TransportError:
        return None


def test_the_tray_icon_appears_its_menu_works_and_follows_the_node(node, tmp_path):
    desktop = Desktop(tmp_path)
    try:
        env = {
            **desktop.env,
            "COROLLA_HOME": str(node.home),
            "QT_QPA_PLATFORM": "xcb",
            "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        }
        app = desktop._start([sys.executable, "-m", "corolla.cli", "app"], env=env, log=tmp_path / "app.log")
        desktop.wait(lambda: desktop.windows("--onlyvisible", "--name", "^Corolla$"), 60, "the window did not open")
        # No window manager here: move the window off the tray in the screen's corner.
        desktop.xdotool("windowmove", desktop.windows("--onlyvisible", "--name", "^Corolla$")[0], "120", "60")
        # The icon is embedded in trayer: trayer grows from its empty 2 px to hold it.
        tray = desktop.windows("--class", "trayer")

        def tray_width() -> int:
            widths = []
            for window in tray:
                geometry = desktop.xdotool("getwindowgeometry", window, check=False).stdout
                for line in geometry.splitlines():
                    if "Geometry:" in line:
                        widths.append(int(line.split()[-1].split("x")[0]))
            return max(widths, default=0)

        desktop.wait(lambda: tray_width() >= 16, 30, "no icon appeared in the system tray")

        def menu_pick(entries_down: int) -> None:
            desktop.xdotool("mousemove", "--sync", "12", "16", "click", "3")
            time.sleep(1.0)
            desktop.xdotool("key", *(["Down"] * entries_down), "Return")

        desktop.wait(lambda: desktop.tray_colour() == "contributing", 30, "the icon is not the contributing flower")
        # Ctrl+W closes the window to the tray (the app keeps running); clicking the icon brings it back.
        window = desktop.windows("--onlyvisible", "--name", "^Corolla$")[0]
        desktop.xdotool("windowfocus", "--sync", window, check=False)
        desktop.xdotool("key", "--window", window, "ctrl+w")
        desktop.wait(lambda: not desktop.windows("--onlyvisible", "--name", "^Corolla$"), 20, "Ctrl+W did not hide")
        assert app.poll() is None
        desktop.xdotool("mousemove", "--sync", "12", "16", "click", "1")
        desktop.wait(lambda: desktop.windows("--onlyvisible", "--name", "^Corolla$"), 20, "the icon did not open it")
        desktop.xdotool("windowmove", desktop.windows("--onlyvisible", "--name", "^Corolla$")[0], "120", "60")
        # Pause from the tray menu: the node follows, and so does the icon.
        menu_pick(3)  # status line (disabled), Open Corolla, Chat, Pause contributing
        desktop.wait(lambda: _state(node) == "paused", 60, "Pause in the tray did nothing")
        desktop.wait(lambda: desktop.tray_colour() == "paused", 30, "the icon did not turn to paused")
        menu_pick(3)  # now "Resume contributing"
        desktop.wait(
            lambda: _state(node) in ("starting", "loading", "online"),
            60,
            "Resume did nothing",
        )
        # "Quit…" in the tray menu asks whether the node should stop too; "Keep it running and quit" (the
        # default button) really ends the app, and the node keeps running.
        time.sleep(1)
        menu_pick(4)
        desktop.wait(lambda: desktop.windows("--onlyvisible", "--name", "^Quit Corolla$"), 20, "Quit… asked nothing")
        question = desktop.windows("--onlyvisible", "--name", "^Quit Corolla$")[0]
        desktop.xdotool("windowfocus", "--sync", question, check=False)
        desktop.xdotool("key", "Return")  # to the focused question: its default button
        desktop.wait(lambda: app.poll() is not None, 20, "Quit in the tray did not end the app")
        assert app.returncode == 0, (tmp_path / "app.log").read_text()
        assert "Fatal Python error" not in (tmp_path / "app.log").read_text()
        assert httpx.get(f"{node.url}/api/ping", timeout=10).status_code == 200  # the node keeps running
    finally:
        desktop.close()
