"""Honest token-step latency under a steady hostile load, against the same server without the attack.

One Corolla block server (a tiny random Llama, 6 blocks) on 127.0.0.1. An honest client times single
token steps ([1, 1, hidden]) in one inference session: first with no attack (baseline), then while a
hostile peer in another process sends malformed and oversized requests as fast as it can (deeply
nested metadata, 3 GiB length prefixes, garbage frames, unknown blocks, free sessions, and full-size
forward passes) with 8 requests in flight (`--concurrency 8,64,512,2048` runs each number in turn).
The two alternate over several rounds in one session of the same server, so that noise from the rest
of the machine falls on both alike; each side's latencies are pooled. Target (issue 10): median and
p99 under attack <= 1.5 x without. Prints JSON.

Methodology. On a real swarm the attacker is another computer; here it shares the server's cores
(2 on the dev machine), so every cycle its Python and its p2pd spend building requests is taken from
the server and the honest client, and that alone slows the honest step whatever the server does. So
the benchmark runs up to three times, each on a fresh server, with the attacker (its Python and its
p2pd) at three CPU priorities:
- `attacker_idle` (judged: `meets_target`): under SCHED_IDLE, which the kernel preempts at once for
  any normal task, so the attacker runs on the CPU time the server and the honest client leave idle.
  That is the closest stand-in for "another computer": the server pays for every request it gets
  (its p2pd, its event loop, its compute), the attacker's own cost of making them lands elsewhere.
  The attack is not weakened by it: it still sends as fast as the server answers (`attack.sent_per_s`;
  on a quiet machine the same rate as at nice 19).
- `attacker_niced`: at nice 19, which still has a small weight in the scheduler and is not always
  preempted at once, so some of the attacker's own cost still lands on the honest step;
- `equal_priority`: at the server's priority, the worst case of an attacker on the same machine.
Each run reports the attack rate (sent, refused after being read, turned away unread and how many of
those the server held before answering, per second of attack: the attacker waits for each answer, so
its rate is what the server's answers allow), the CPU each party used (`cpu_cores_busy`, in
cores: server Python, server p2pd and DHT, attacker Python, attacker p2pd and DHT, honest client and
its p2pd), quiet vs attacked, and how much the server's memory grew while attacked. An honest step
left without a reply for a minute fails the run (`--keep-log FILE` keeps the server's log then).
p99 is taken over 1,200 steps a side by default (a p99 of 300 steps is the 3rd-worst sample, too
noisy to judge).

Usage (as root, in a loopback-only namespace; about 4-5 minutes for the three runs, 70-90 s each):
    unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh .venv/bin/python benchmarks/hostile_load.py
Options: --methodology {all,attacker-idle,attacker-niced,equal-priority}, --malformed-only (no valid
full-size forward passes), --rounds, --steps, --concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from corolla.swarm import protocol, steptrace
from corolla.testing.hostile import HostilePeer, deep_metadata, frame
from corolla.testing.swarm import tiny_block_server
from corolla.testing.wire import WireClient, step_request

PREFIX = "bench-hostile"
BLOCKS = 6
HIDDEN = 64
CHAIN = protocol.chain_uids(PREFIX, 0, BLOCKS)
TRACE_TO: str | None = None  # --trace DIR: the client's stamps per step (the server's: COROLLA_STEP_TRACE)
PHASE = "warm-up"


STEP_WAIT_S = 60.0  # an honest step with no reply by then is lost: the run fails and says so


class StepLost(RuntimeError):
    pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies_s: list[float]) -> dict:
    ms = [v * 1000 for v in latencies_s]
    return {"steps": len(ms), "median_ms": round(statistics.median(ms), 3), "p99_ms": round(percentile(ms, 0.99), 3)}


class CpuMeter:
    """CPU seconds (user + system) spent by each party's processes, counted separately while the
    attack is on and while it is off: where the honest step's time goes."""

    def __init__(self, parties: dict[str, list[int]]):
        """`parties`: name -> the pids counted under it (each alone, not its children)."""
        self.roots = {name: [psutil.Process(pid) for pid in pids] for name, pids in parties.items()}
        self.totals: dict[str, dict[str, float]] = {"quiet": {}, "attacked": {}}
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, roots in self.roots.items():
            seconds = 0.0
            for root in roots:
                with contextlib.suppress(psutil.Error):
                    times = root.cpu_times()
                    seconds += times.user + times.system
            out[name] = seconds
        return out

    def start(self) -> None:
        self._start, self._wall = self._now(), time.monotonic()

    def stop(self, phase: str) -> None:
        now, wall = self._now(), time.monotonic() - self._wall
        bucket = self.totals[phase]
        for name, seconds in now.items():
            bucket[name] = bucket.get(name, 0.0) + seconds - self._start[name]
        bucket["wall_s"] = bucket.get("wall_s", 0.0) + wall

    def report(self) -> dict:
        """Per phase: each party's CPU seconds as a share of the phase's wall time (2.0 = both cores)."""
        out = {}
        for phase, bucket in self.totals.items():
            wall = bucket.get("wall_s", 0.0) or 1.0
            out[phase] = {name: round(seconds / wall, 3) for name, seconds in bucket.items() if name != "wall_s"}
            out[phase]["wall_s"] = round(wall, 2)
        return out


def parties(server_pid: int, hostile_pid: int) -> dict[str, list[int]]:
    """Every process of the run by party: the server's Python and its helpers (p2pd, the DHT child
    and its p2pd), the attacker's likewise, and the honest client (this process and its p2pd)."""

    def tree(pid: int) -> list[int]:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]

    own = [p.pid for p in psutil.Process().children() if p.pid not in (server_pid, hostile_pid)]
    honest = [os.getpid(), *own, *(c for pid in own for c in tree(pid))]
    return {
        "server_python": [server_pid],
        "server_p2pd_and_dht": tree(server_pid),
        "attacker_python": [hostile_pid],
        "attacker_p2pd_and_dht": tree(hostile_pid),
        "honest_client_and_p2pd": honest,
    }


def server_memory_mib(server_pid: int) -> dict[str, float]:
    """Resident memory of the server's Python and of its helpers (p2pd, the DHT child and its p2pd)."""
    root = psutil.Process(server_pid)
    helpers = 0
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            helpers += child.memory_info().rss
    return {"server_python": root.memory_info().rss / 2**20, "server_p2pd_and_dht": helpers / 2**20}


def time_steps(client: WireClient, peer_id: str, steps: int) -> list[float]:
    """One session: a 4-token prompt, then `steps` single-token steps, each sent after the previous
    reply; returns each step's round trip."""
    session_id = str(uuid.uuid4())
    replies: asyncio.Queue = asyncio.Queue()
    sent: list[float] = []
    received: list[float] = []

    async def requests():
        yield step_request(CHAIN, torch.randn(1, 4, HIDDEN), max_length=steps + 8, session_id=session_id)
        await replies.get()
        for i in range(steps):
            sent.append(time.perf_counter())
            yield step_request(CHAIN, torch.randn(1, 1, HIDDEN), session_id=session_id, step_id=str(i))
            try:
                await asyncio.wait_for(replies.get(), STEP_WAIT_S)
            except TimeoutError:
                raise StepLost(f"honest step {i} of session {session_id} got no reply in {STEP_WAIT_S} s") from None
        yield step_request("", None)

    async def run():
        stream = await client.stub(peer_id).rpc_inference(requests())
        async for _ in stream:
            received.append(time.perf_counter())
            replies.put_nowait(None)
            if len(received) == steps + 1:
                break

    client.run(run(), timeout=600)
    if TRACE_TO:
        to_wall = steptrace.now() - time.perf_counter()  # the server stamps on the trace's (wall) clock
        with open(TRACE_TO, "a") as out:
            for i, (start, done) in enumerate(zip(sent, received[1:], strict=True)):
                stamps = {"session": session_id, "step": str(i), "phase": PHASE}
                stamps.update(sent=start + to_wall, received=done + to_wall)
                out.write(json.dumps(stamps) + "\n")
    return [done - start for start, done in zip(sent, received[1:], strict=True)]


# --- the hostile peer (run in its own process) ------------------------------------------------------


def attack(maddr: str, peer_id: str, seconds: float, concurrency: int, switch: Path, malformed_only: bool) -> None:
    """Attack while `switch` exists, until `switch`.stop exists (at most `seconds`)."""
    with HostilePeer(maddr) as hostile:
        switch.with_suffix(".ready").touch()  # joined: the timed rounds may begin
        counts = {"sent": 0, "refused_or_cut": 0}
        hidden = serialize_torch_tensor(torch.randn(1, 2, HIDDEN))
        full_forward = runtime_pb2.ExpertRequest(
            uid=CHAIN, tensors=[serialize_torch_tensor(torch.randn(1, 256, HIDDEN))], metadata=b""
        )
        zero = step_request(CHAIN, torch.randn(1, 0, HIDDEN), max_length=0)

        def payloads():
            while True:
                yield "rpc_forward", runtime_pb2.ExpertRequest(uid=CHAIN, metadata=deep_metadata(), tensors=[hidden])
                yield "rpc_inference", frame(b"\x00" * 1024, claimed_length=3 * 2**30)
                yield "rpc_forward_stream", frame(bytes(range(256)) * 64)
                yield "rpc_forward", runtime_pb2.ExpertRequest(uid="x" * 100_000)
                if not malformed_only:
                    yield "rpc_forward", full_forward
                zero.metadata = MSGPackSerializer.dumps({"max_length": 0, "session_id": str(uuid.uuid4())})
                yield "rpc_inference", frame(zero.SerializeToString())

        source = payloads()

        attack_on = asyncio.Event()
        finished = asyncio.Event()

        async def worker() -> None:
            from hivemind.p2p import PeerID

            target = PeerID.from_base58(peer_id)
            while not finished.is_set():
                if not attack_on.is_set():
                    # Workers wait on the one switch watcher: hundreds of workers each polling the file
                    # would keep the attacker busy in the quiet rounds too and skew the baseline.
                    await attack_on.wait()
                    continue
                rpc, payload = next(source)
                counts["sent"] += 1
                try:
                    if isinstance(payload, bytes):
                        _, reader, writer = await hostile.p2p.call_binary_stream_handler(
                            target, f"{protocol.HANDLER_CLASS_NAME}.{rpc}"
                        )
                        writer.write(payload)
                        await asyncio.wait_for(reader.read(4096), 5)
                        writer.close()
                    else:
                        await getattr(hostile.stub(peer_id), rpc)(payload, timeout=5)
                except Exception:
                    counts["refused_or_cut"] += 1

        async def switch_watcher(deadline: float) -> None:
            """Turns the attack on and off with the switch file; counts the seconds it was on, for its rate."""
            stop = switch.with_suffix(".stop")
            last = time.monotonic()
            while last < deadline and not stop.exists():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                if attack_on.is_set():
                    counts["on_s"] = counts.get("on_s", 0.0) + now - last
                last = now
                if switch.exists():
                    attack_on.set()
                else:
                    attack_on.clear()
            finished.set()
            attack_on.set()  # wakes the waiting workers, which see `finished`

        async def main():
            deadline = time.monotonic() + seconds
            await asyncio.gather(switch_watcher(deadline), *(worker() for _ in range(concurrency)))

        hostile.run(main(), timeout=seconds + 60)
        print(json.dumps(counts), flush=True)


# --- the run ---------------------------------------------------------------------------------------


PRIORITIES = {"attacker_idle": "idle", "attacker_niced": 19, "equal_priority": 0}


def lower_priority(priority: int | str) -> None:
    """In the attacker's process before it starts (its p2pd inherits it): SCHED_IDLE or a nice value."""
    if priority == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority:
        os.nice(priority)


@contextlib.contextmanager
def _keep_log_on_failure(log: Path, keep: str | None):
    """When the run fails, copy the server's log to `keep` (the run's folder is deleted on the way out)."""
    try:
        yield
    except BaseException:
        if keep:
            Path(keep).write_bytes(log.read_bytes())
        raise


def measure(args: argparse.Namespace, attacker_priority: int | str) -> dict:
    """One server, one honest client, one attacker at `attacker_priority` ("idle": SCHED_IDLE, else a
    nice value): quiet and attacked rounds."""
    from corolla.swarm.models.tiny import make_tiny_model

    global TRACE_TO, PHASE
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        run_dir = Path(args.trace) / f"attacker-{attacker_priority}"  # the server's own lines land here too
        run_dir.mkdir(exist_ok=True)
        TRACE_TO = str(run_dir / "client.jsonl")
        os.environ[steptrace.ENV] = str(run_dir)
    with tempfile.TemporaryDirectory(prefix="corolla-hostile-bench-") as tmp:
        model = make_tiny_model("llama", Path(tmp) / "model")
        threads = ("--num-threads", str(args.server_threads)) if args.server_threads else ()
        with (
            tiny_block_server(Path(tmp), model, PREFIX, BLOCKS, *threads, inference_max_length=1024) as server,
            _keep_log_on_failure(server.log_path, args.keep_log),
        ):
            switch = Path(tmp) / "attack-on"
            with WireClient(server.maddr) as client:
                time_steps(client, server.peer_id, 20)  # warm-up
                seconds = 600.0
                command = [sys.executable, __file__, "--concurrency", str(args.concurrency)]
                command += ["--malformed-only"] if args.malformed_only else []
                command += ["--attack", server.maddr, server.peer_id, str(seconds), str(switch)]
                lower = functools.partial(lower_priority, attacker_priority)
                hostile = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=lower)
                # The hostile peer joins the swarm first (its DHT and p2pd take seconds, more on a busy
                # machine): attacked rounds timed before it could send would measure no attack at all.
                ready = switch.with_suffix(".ready")
                deadline = time.monotonic() + 180
                while not ready.exists() and hostile.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not ready.exists():
                    hostile.kill()
                    raise SystemExit("the hostile peer did not join the swarm")
                quiet: list[float] = []
                attacked: list[float] = []
                per_round = max(args.steps // args.rounds, 10)
                meter = CpuMeter(parties(server.process.pid, hostile.pid))
                before = server.stats()
                memory_before = server_memory_mib(server.process.pid)
                memory_peak = dict(memory_before)
                for _ in range(args.rounds):
                    meter.start()
                    PHASE = "quiet"
                    quiet += time_steps(client, server.peer_id, per_round)
                    meter.stop("quiet")
                    switch.touch()
                    time.sleep(1.0)  # the attack reaches full speed
                    meter.start()
                    PHASE = "attacked"
                    attacked += time_steps(client, server.peer_id, per_round)
                    meter.stop("attacked")
                    for part, mib in server_memory_mib(server.process.pid).items():  # the attack still on
                        memory_peak[part] = max(memory_peak[part], mib)
                    switch.unlink()
                    time.sleep(1.0)  # and dies down
                switch.with_suffix(".stop").touch()
                output = hostile.communicate(timeout=120)[0] or ""
                counts = json.loads(output.splitlines()[-1]) if output.strip() else {}
                time.sleep(1.5)  # the stats file is written every second
                after = server.stats()
            alive = server.process.poll() is None
    base, hit = summary(quiet), summary(attacked)
    on_s = counts.get("on_s") or 1.0
    counters = ("requests_refused", "requests_turned_away", "requests_held")
    server_side = {key: after.get(key, 0) - before.get(key, 0) for key in counters}
    return {
        "attacker_priority": "SCHED_IDLE" if attacker_priority == "idle" else f"nice {attacker_priority}",
        "baseline": base,
        "under_attack": hit,
        "ratio_median": round(hit["median_ms"] / base["median_ms"], 3),
        "ratio_p99": round(hit["p99_ms"] / base["p99_ms"], 3),
        "attack": {
            "sent": counts.get("sent"),
            "failed_at_the_attacker": counts.get("refused_or_cut"),
            "on_s": round(on_s, 1),
            "sent_per_s": round(counts.get("sent", 0) / on_s, 1),
            **server_side,
            "refused_or_turned_away_per_s": round(
                (server_side["requests_refused"] + server_side["requests_turned_away"]) / on_s, 1
            ),
        },
        "server_alive_after": alive,
        # Resident memory at the end of each attacked round (the attack's requests still in flight or
        # held), highest of the rounds, against before the first attack.
        "server_memory_growth_mib": {part: round(memory_peak[part] - memory_before[part], 1) for part in memory_before},
        "cpu_cores_busy": meter.report(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="timed token steps on each side (quiet, attacked)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[8],
        help="hostile requests in flight; a comma-separated list runs each in turn (e.g. 8,64,512,2048)",
    )
    parser.add_argument("--malformed-only", action="store_true", help="no valid full-size forward passes")
    parser.add_argument("--rounds", type=int, default=6, help="alternations of quiet and attacked steps")
    parser.add_argument(
        "--methodology",
        choices=["all", "attacker-idle", "attacker-niced", "equal-priority"],
        default="all",
        help="the attacker under SCHED_IDLE (standing in for another computer; judged), at nice 19, "
        "at the server's priority, or all three",
    )
    parser.add_argument("--server-threads", type=int, help="the server's --num-threads (default 1)")
    parser.add_argument("--keep-log", metavar="FILE", help="where to copy the server's log when a run fails")
    parser.add_argument("--trace", metavar="DIR", help="write per-step stamps of client and server to DIR (jsonl)")
    parser.add_argument("--attack", nargs=4, metavar=("MADDR", "PEER_ID", "SECONDS", "SWITCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        maddr, peer_id, seconds, switch = args.attack
        attack(maddr, peer_id, float(seconds), args.concurrency[0], Path(switch), args.malformed_only)
        return

    started = time.monotonic()
    by_concurrency: dict[str, dict] = {}
    for concurrency in args.concurrency:
        runs = by_concurrency[str(concurrency)] = {}
        for name, priority in PRIORITIES.items():
            if args.methodology in ("all", name.replace("_", "-")):
                runs[name] = measure(argparse.Namespace(**{**vars(args), "concurrency": concurrency}), priority)
    judged = next(iter(by_concurrency[str(args.concurrency[0])]))  # the first of idle, niced, equal that ran

    def meets(run: dict) -> bool:
        return run["ratio_median"] <= 1.5 and run["ratio_p99"] <= 1.5 and run["server_alive_after"]

    result = {
        "benchmark": "hostile_load",
        "target_ratio": 1.5,
        "judged_on": judged,
        "methodology_note": "attacker_idle (judged): the attacker and its p2pd under SCHED_IDLE, running on "
        "the CPU the server and the honest client leave idle, standing in for another computer (on this "
        "machine they share the server's cores; the server still pays for every request it gets); "
        "attacker_niced: at nice 19, which still takes some CPU from the others; equal_priority: at the "
        "server's priority",
        "concurrency": args.concurrency,
        "malformed_only": args.malformed_only,
        "rounds": args.rounds,
        # One entry per number of hostile requests in flight, each with its runs by methodology.
        "by_concurrency": by_concurrency,
        "meets_target_by_concurrency": {c: meets(runs[judged]) for c, runs in by_concurrency.items()},
        "meets_target": all(meets(runs[judged]) for runs in by_concurrency.values()),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
