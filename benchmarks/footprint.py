"""Corolla's memory footprint on this computer, as a new user would see it. Prints JSON.

For each model (the embedded SmolLM2-135M-Instruct, float32 on CPU, and the tiny random-weight Llama)
a real `corolla node` runs with a real window (offscreen) and is measured in three moments:

- idle: the node awaiting the user's consent (contributing nothing) with the window open (and its
  request for the hardware and block plan answered);
- contributing: the node serving every block of the model;
- chatting: the same, while a chat reply streams (the window's chat API, /api/chats; it is measured
  after the first tokens arrived, so the client's model and DHT are up). While the node contributes,
  the reply is written in the block server's process (chat_engine/); before that change, by the
  node's own swarm client.

Each moment lists every process (the window, the node and everything it started: block server,
hivemind DHT children, p2pd, torch_shm_manager) with its PSS (proportional set size: shared pages
divided among their users, what the processes together really hold) and RSS, plus the totals.
Then the pauses: "pause" followed by "resume" (time until the server is online again) and
"pause and free memory" (the footprint while paused that way), where the node offers them.

With `--before REF`, the same run is repeated for the code at git commit REF (its app/ extracted to
a temporary folder), so before and after come from one run on one machine state. `--speed-rounds N`
then also compares chat speed: a node of each code (no window) serving at once, N chats each,
alternating between them, so a busy machine slows both alike.

Targets (issue 29, SmolLM2 float32 on CPU): chatting at most 1.2 GB PSS in at most 5 processes, idle
at most 400 MB PSS, resume after a memory-keeping pause at most 2 s.

Usage: python benchmarks/footprint.py [--models smollm2,tiny] [--before REF] [--smollm2 FOLDER]
       (ideally in `unshare -n`; COROLLA_TEST_SMOLLM2=FOLDER reuses a converted SmolLM2 folder)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]

MB = 1e6
TARGETS = {"chatting_pss_bytes": 1.2e9, "chatting_processes": 5, "idle_pss_bytes": 400e6, "resume_s": 2.0}
SETTLE_S = 5.0

WINDOW = r"""
import sys
from PySide6.QtWidgets import QApplication
app = QApplication([])
from corolla.gui.node_client import NodeClient
from corolla.gui.prefs import open_prefs
from corolla.gui.window import MainWindow
window = MainWindow(NodeClient(sys.argv[1], sys.argv[2]), prefs=open_prefs(sys.argv[3]))
window.resize(1200, 780)
window.show()
print("window shown", flush=True)
app.exec()
"""


# --- measuring ---------------------------------------------------------------------------------------
def _tree(pids: list[int], home: Path) -> list[psutil.Process]:
    """The given processes, everything they started, and any process carrying this run's COROLLA_HOME
    (a daemon re-parented away from its starter still counts)."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for process in (root, *root.children(recursive=True)):
                found[process.pid] = process
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid not in found and process.environ().get("COROLLA_HOME") == str(home):
                found[process.pid] = process
    return list(found.values())


def _role(process: psutil.Process, window_pid: int, node_pid: int) -> str:
    cmd = " ".join(process.cmdline())
    if process.pid == window_pid:
        return "window"
    if process.pid == node_pid:
        return "node"
    if process.name() == "p2pd" or os.path.basename(process.cmdline()[0]) == "p2pd":  # not a path with p2pd in it
        return "p2pd"
    if "torch_shm_manager" in cmd:
        return "torch_shm_manager"
    if "serve" in process.cmdline():
        return "block server"
    with contextlib.suppress(psutil.Error):
        parent = process.parent()
        if parent is not None and parent.pid == node_pid:
            return "node's DHT child"
        if parent is not None and "serve" in parent.cmdline():
            return "block server's DHT child"
    return process.name()


def measure(window_pid: int, node_pid: int, home: Path) -> dict:
    processes = []
    for process in _tree([window_pid, node_pid], home):
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            info = process.memory_full_info()
            processes.append(
                {
                    "role": _role(process, window_pid, node_pid),
                    "pid": process.pid,
                    "pss_mb": round(info.pss / MB, 1),
                    "rss_mb": round(info.rss / MB, 1),
                }
            )
    processes.sort(key=lambda p: -p["pss_mb"])
    return {
        "processes": len(processes),
        "pss_mb": round(sum(p["pss_mb"] for p in processes), 1),
        "rss_mb": round(sum(p["rss_mb"] for p in processes), 1),
        "per_process": processes,
    }


# --- a node and a window -----------------------------------------------------------------------------
class Run:
    def __init__(self, app_dir: Path, model: str, smollm2: Path | None, workdir: Path, window: bool = True):
        self.home = workdir / "home"
        self.home.mkdir(parents=True)
        if model == "smollm2" and smollm2 is not None:
            target = self.home / "cache" / "models" / smollm2.name
            target.parent.mkdir(parents=True)
            try:
                shutil.copytree(smollm2, target, copy_function=os.link)
            except OSError:
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(smollm2, target)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(app_dir),
            "COROLLA_HOME": str(self.home),
            "COROLLA_DEFAULT_MODEL": model,
            "COROLLA_AWAIT_CONSENT": "1" if window else "0",
            "PYTHONUNBUFFERED": "1",
            "QT_QPA_PLATFORM": "offscreen",
        }
        self.log = open(workdir / "node.log", "ab")  # noqa: SIM115
        self.node = subprocess.Popen(
            [sys.executable, "-m", "corolla.cli", "node"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
            cwd=workdir,
        )
        self.url, self.token = self._wait_node()
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=300)
        self.window: subprocess.Popen | None = None
        if window:
            self.window = subprocess.Popen(
                [sys.executable, "-c", WINDOW, self.url, self.token, str(workdir / "window.ini")],
                stdout=subprocess.PIPE,
                stderr=self.log,
                start_new_session=True,
                env=self.env,
                cwd=workdir,
            )
            assert self.window.stdout is not None and b"window shown" in self.window.stdout.readline()

    def _wait_node(self, timeout: float = 120.0) -> tuple[str, str]:
        lock = self.home / "config" / "node.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.node.poll() is not None:
                raise RuntimeError(f"the node exited with {self.node.returncode}")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError, httpx.HTTPError):
                data = json.loads(lock.read_text())
                token = Path(data["token_file"]).read_text().strip()
                if data["pid"] == self.node.pid and httpx.get(f"{data['url']}/api/ping", timeout=2).status_code == 200:
                    return data["url"], token
            time.sleep(0.2)
        raise RuntimeError("the node did not start")

    def measure(self) -> dict:
        return measure(self.window.pid if self.window else -1, self.node.pid, self.home)

    def state(self) -> str:
        return self.api.get("/api/status").json()["contribution"]["state"]

    def wait_state(self, state: str, timeout: float = 600.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.state() == state:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise RuntimeError(f"contribution never became {state}")

    def action(self, action: str) -> bool:
        return self.api.post(f"/api/contribution/{action}").status_code == 200

    def stream_chat(self, first_tokens: threading.Event, result: dict) -> None:
        """A streamed reply through the window's chat API (/api/chats: where a contributing node has it
        written by its block server's process); the time per token after the first."""
        chat = self.api.post("/api/chats", json={"title": "footprint"}).json()
        body = {"content": "Tell me a long story about a lighthouse keeper.", "max_new_tokens": 120, "temperature": 0}
        times, end = [], None
        with self.api.stream("POST", f"/api/chats/{chat['id']}/messages", json=body) as response:
            for line in response.iter_lines():
                if line == "event: token":
                    times.append(time.perf_counter())
                    if len(times) == 8:
                        first_tokens.set()
                elif line.startswith("event: ") and line[7:] in ("done", "error"):
                    end = line[7:]
        first_tokens.set()
        result["tokens"], result["end"] = len(times), end
        if len(times) > 2:
            result["tokens_per_s"] = round((len(times) - 1) / (times[-1] - times[0]), 2)

    def close(self) -> None:
        if self.window is not None:
            self.window.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.window.wait(10)
        with contextlib.suppress(Exception):
            self.api.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.node.pid, signal.SIGTERM)
        try:
            self.node.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.node.pid, signal.SIGKILL)
        for process in _tree([], self.home):  # nothing may outlive a run
            with contextlib.suppress(psutil.Error):
                process.kill()
        self.log.close()


def scenario(app_dir: Path, model: str, smollm2: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="corolla-footprint-") as tmp:
        run = Run(app_dir, model, smollm2, Path(tmp))
        try:
            # The window asks for the hardware (and the block plan) as it opens; waiting for that answer
            # measures every run in the same state instead of before or after it, as the timing fell.
            run.api.get("/api/hardware")
            time.sleep(SETTLE_S)
            result = {"idle": run.measure()}
            assert run.action("start")
            result["start_to_online_s"] = round(run.wait_state("online"), 2)
            time.sleep(SETTLE_S)
            result["contributing"] = run.measure()
            first_tokens, chat = threading.Event(), {}
            streamer = threading.Thread(target=run.stream_chat, args=(first_tokens, chat))
            streamer.start()
            first_tokens.wait(600)
            result["chatting"] = run.measure()
            streamer.join(600)
            result["chat"] = chat
            result["pauses"] = pauses(run)
            return result
        finally:
            run.close()


def chat_speed(codes: dict[str, Path], model: str, smollm2: Path | None, rounds: int) -> dict:
    """Chat tokens/s of each code's node (no window), all serving at once, chats alternating between
    them round by round: a busy machine slows each alike."""
    with tempfile.TemporaryDirectory(prefix="corolla-speed-") as tmp:
        runs: dict[str, Run] = {}
        try:
            for label, app_dir in codes.items():
                runs[label] = Run(app_dir, model, smollm2, Path(tmp) / label, window=False)
            for run in runs.values():
                run.wait_state("online")
            speeds: dict[str, list] = {label: [] for label in runs}
            for i in range(rounds):
                for label in list(runs)[:: 1 if i % 2 == 0 else -1]:
                    chat: dict = {}
                    runs[label].stream_chat(threading.Event(), chat)
                    speeds[label].append(chat.get("tokens_per_s"))
            return {
                label: {"tokens_per_s": v, "mean": round(sum(v) / len(v), 2) if all(v) else None}
                for label, v in speeds.items()
            }
        finally:
            for run in runs.values():
                run.close()


def pauses(run: Run) -> dict:
    """Pause then resume (seconds until online again); pause and free memory (footprint meanwhile)."""
    out = {}
    run.action("pause")
    run.wait_state("paused", 120)
    time.sleep(2)
    out["paused"] = _totals(run.measure())
    t0 = time.monotonic()
    run.action("resume")
    run.wait_state("online")
    out["resume_s"] = round(time.monotonic() - t0, 2)
    if run.action("pause-free"):
        run.wait_state("paused", 120)
        time.sleep(2)
        out["paused_and_freed"] = _totals(run.measure())
        t0 = time.monotonic()
        run.action("resume")
        run.wait_state("online")
        out["resume_after_freeing_s"] = round(time.monotonic() - t0, 2)
    return out


def _totals(measured: dict) -> dict:
    return {k: measured[k] for k in ("processes", "pss_mb", "rss_mb")}


def extract(ref: str, folder: Path) -> Path:
    """app/ as it was at commit `ref`."""
    archive = subprocess.run(["git", "archive", ref, "app"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "app"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,tiny")
    parser.add_argument("--before", metavar="REF", help="also measure the code at this git commit, same run")
    parser.add_argument("--smollm2", type=Path, default=os.environ.get("COROLLA_TEST_SMOLLM2"))
    parser.add_argument("--speed-rounds", type=int, default=0, help="with --before: chats per node, alternating")
    args = parser.parse_args()
    codes = {"after": ROOT / "app"}
    with tempfile.TemporaryDirectory(prefix="corolla-footprint-before-") as tmp:
        if args.before:
            codes = {"before": extract(args.before, Path(tmp)), **codes}
        report: dict = {"targets": TARGETS, "before_ref": args.before, "cpus": os.cpu_count(), "runs": {}}
        report["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
        for model in args.models.split(","):
            for label, app_dir in codes.items():
                figures = scenario(app_dir, model, args.smollm2)
                report["runs"][f"{model}/{label}"] = figures
                print(f"{model}/{label}: {json.dumps(_summary(figures))}", file=sys.stderr, flush=True)
        report["summary"] = {name: _summary(figures) for name, figures in report["runs"].items()}
        if args.speed_rounds and args.before:
            for model in args.models.split(","):
                report.setdefault("chat_speed_alternating", {})[model] = chat_speed(
                    codes, model, args.smollm2, args.speed_rounds
                )
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=1))


def _summary(figures: dict) -> dict:
    return {
        "idle": _totals(figures["idle"]),
        "contributing": _totals(figures["contributing"]),
        "chatting": _totals(figures["chatting"]),
        "chat_tokens_per_s": figures["chat"].get("tokens_per_s"),
        "resume_s": figures["pauses"].get("resume_s"),
        "paused_and_freed_pss_mb": figures["pauses"].get("paused_and_freed", {}).get("pss_mb"),
    }


if __name__ == "__main__":
    main()
