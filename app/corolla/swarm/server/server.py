"""The block server's lifecycle: join, choose blocks, load, serve, announce, rebalance, leave.

One process: the DHT runs on a thread of it and p2pd as its child process; RPCs are served on this process's
asyncio loop; the blocks run on one compute thread, so the loop stays responsive during a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

from corolla.chat_engine.client_host import SharedSwarm, peer_id_of
from corolla.chat_engine.listener import start_from_env as start_chat_listener
from corolla.swarm import protocol, steptrace
from corolla.swarm.dht_records import compute_spans, get_module_infos
from corolla.swarm.direct_link import advertised_hosts, direct_bind_host, same_family
from corolla.swarm.local_calls import LocalServer
from corolla.swarm.models import LoadOptions, load_span, open_checkpoint, resolve_dht_prefix
from corolla.swarm.models.devices import (
    check_quantization_supported,
    checkpoint_dtype_of,
    dtype_name,
    resolve_device,
    resolve_dtype,
)
from corolla.swarm.models.errors import EngineError
from corolla.swarm.models.loading import estimate_memory
from corolla.swarm.models.span import BlockSpan
from corolla.swarm.peers import start_dht
from corolla.swarm.protocol import ServerState
from corolla.swarm.reachability import (
    NetworkPlan,
    PlanInBackground,
    ReachabilityProtocol,
    plan_network,
)
from corolla.swarm.server.adapters import check_adapter_folders, load_adapters
from corolla.swarm.server.announcing import SwarmPresenceMixin, one_line
from corolla.swarm.server.block_selection import choose_best_blocks
from corolla.swarm.server.config import PARENT_PID_ENV, ServerConfig
from corolla.swarm.server.handler import HandlerLimits, TransformerConnectionHandler
from corolla.swarm.server.memory_cache import CacheBudget
from corolla.swarm.server.open_files import raise_open_file_limit
from corolla.swarm.server.pings import NextPings
from corolla.swarm.server.stats import ServerStats, StatsFile
from corolla.swarm.server.throughput import Throughput, cached_throughput, measure, save_throughput

logger = logging.getLogger(__name__)
LEAVE_GRACE_S = 8.0  # from a stop request to leaving the serving loop (OFFLINE sent, handlers off)
ANNOUNCE_OFFLINE_TIMEOUT_S = 4.0
DETACH_TIMEOUT_S = 2.0
SHUTDOWN_DEADLINE_S = 12.0  # then the process exits whatever it was doing (the tests allow 15 s)


def expected_parent_pid() -> int:
    """The pid this server must outlive no longer than: the one its starter named in the environment
    (a node that died while this process was still importing is then noticed), else the current parent."""
    try:
        return int(os.environ[PARENT_PID_ENV])
    except (KeyError, ValueError):
        return os.getppid()


class BlockServer(SwarmPresenceMixin):
    def __init__(self, config: ServerConfig, early_plan: PlanInBackground | None = None):
        self.config = config
        self._early_plan = early_plan  # the reachability check, if the caller started it already
        self.stats = ServerStats(model=config.model)
        self._stats_file = StatsFile(config.stats_path) if config.stats_path is not None else None
        self.checkpoint = open_checkpoint(
            config.model, token=config.token, revision=config.revision, cache_dir=config.cache_dir
        )
        self.dht_prefix = resolve_dht_prefix(self.checkpoint, config.dht_prefix)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.torch_dtype, self.device, checkpoint_dtype_of(self.checkpoint.config))
        check_quantization_supported(config.quant_type, self.device)
        self.total_blocks = self.checkpoint.num_blocks
        if config.blocks is not None:
            start, end = config.blocks
            if not 0 <= start < end <= self.total_blocks:
                raise EngineError(f"--blocks {start}:{end} is outside the model's blocks 0:{self.total_blocks}")
        model_config = self.checkpoint.config
        self.inference_max_length = config.inference_max_length or protocol.default_inference_max_length(model_config)
        self.max_batch_size = config.max_batch_size or self.inference_max_length
        self.attn_cache_tokens = config.attn_cache_tokens or 2 * self.inference_max_length
        element = torch.empty((), dtype=self.dtype).element_size()
        self.bytes_per_token_block = 2 * self.checkpoint.family.kv_dim(model_config) * element
        self.stats.dht_prefix, self.stats.torch_dtype = self.dht_prefix, dtype_name(self.dtype)
        self.stats.quant_type = config.quant_type
        self.state = ServerState.OFFLINE
        self.span: BlockSpan | None = None
        self.adapters: tuple[str, ...] = ()
        self.budget: CacheBudget | None = None
        self.throughput: Throughput | None = None
        self.announced_throughput = 0.0
        self.next_pings: NextPings | None = None
        self.dht = None
        self._unsaved_throughput: Throughput | None = None
        self.network: NetworkPlan | None = None
        self.reachability_service: ReachabilityProtocol | None = None
        self._reachability_watch: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._paused, self._resumed = asyncio.Event(), asyncio.Event()  # a pause that keeps the blocks
        self.exit_code = 0  # RETAKE_RELAY_EXIT_CODE: stopped to take a relay again (the node restarts it at once)
        self._wake_announcer = asyncio.Event()

    # --- entry point -------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (a second one forces the exit); returns the process exit code."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.stats.num_threads = torch.get_num_threads()
        self.stats.omp_wait_policy = os.environ.get("OMP_WAIT_POLICY", "")
        try:
            return asyncio.run(self._main())
        finally:
            if self._early_plan is not None:
                self._early_plan.cancel()  # stopped while still checking: its daemon goes too
            if self.dht is not None:
                self.dht.shutdown()  # bounded: in order if it answers, else killed with p2pd

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if hasattr(signal, "SIGUSR1"):
            loop.add_signal_handler(signal.SIGUSR1, self._on_pause, True)
            loop.add_signal_handler(signal.SIGUSR2, self._on_pause, False)
        writer = asyncio.create_task(self._write_stats_forever())
        chat_listener = self._chat_listener = await start_chat_listener()  # the node's chats (chat_engine/)
        if self.config.exit_with_parent:
            self._orphan_watch = asyncio.create_task(self._stop_when_orphaned(expected_parent_pid()))
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corolla-compute")
        body = asyncio.create_task(self._serve_until_stopped(executor))
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({body, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not body.done() and self.state == ServerState.ONLINE:
                # Serving: _serve sees the stop itself and leaves in order (OFFLINE, handlers off).
                await asyncio.wait({body}, timeout=LEAVE_GRACE_S)
            if not body.done():  # still joining or loading, or leaving takes too long
                body.cancel()
                await asyncio.wait({body}, timeout=LEAVE_GRACE_S)
            if body.done() and not body.cancelled() and body.exception() is not None:
                if not self._stop.is_set():
                    raise body.exception()
                # Stopping anyway: the signal also reached a child that was starting (p2pd, shm manager).
                logger.warning("while stopping: %s", one_line(body.exception()))
            return self.exit_code
        finally:
            for task in (body, stop, writer, self._reachability_watch):
                if task is not None:
                    task.cancel()
            if self.reachability_service is not None:  # and its probe daemon
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.reachability_service.detach(), timeout=DETACH_TIMEOUT_S)
            executor.shutdown(wait=False)
            if chat_listener is not None:
                await chat_listener.close()
            self._set_state("offline", "stopped")
            self._write_stats()

    async def _serve_until_stopped(self, executor: ThreadPoolExecutor) -> None:
        check_adapter_folders(self.config.adapters)
        self._set_state("joining", "checking whether other peers can reach this computer")
        self._set_reachability("checking")
        if self._early_plan is not None:
            self.network = network = await self._early_plan.result()
        else:
            self.network = network = await plan_network(**network_plan_arguments(self.config))
        self._set_state("joining", "starting the DHT")
        # In a thread: a signal during a slow join (unreachable peers) is handled at once.
        self.dht = await asyncio.to_thread(
            start_dht,
            self.config.initial_peers,
            client_mode=network.client_mode,
            host_maddrs=self.config.host_maddrs,
            announce_maddrs=network.announce_maddrs,
            identity_path=self.config.identity_path,
            nat_port_map=self.config.nat_port_map,
            use_relay=self.config.use_relay,
            use_auto_relay=self.config.use_auto_relay and network.use_auto_relay,
            auto_nat=self.config.auto_nat,
            force_reachability=network.force_reachability,
            trusted_relays=network.trusted_relays,
            in_process=True,  # no forked copy of this process (torch imported): local_dht.py says why
        )
        self.stats.using_relay = network.using_relay
        main_p2p = await self.dht.replicate_p2p()
        if getattr(self, "_chat_listener", None) is not None:  # its chats' client shares this DHT and p2pd
            self._chat_listener.share_swarm(shared_swarm(self.dht, main_p2p, self.config.initial_peers))
        self.reachability_service = ReachabilityProtocol()  # answers other peers' checks (Petals §5.5)
        if not network.client_mode:
            await self.reachability_service.attach(main_p2p)
        self._set_reachability("checking" if network.trusted_relays else network.state)  # relays: proven below
        self._reachability_watch = asyncio.create_task(self._watch_reachability(main_p2p))
        self.peer_id = self.dht.peer_id.to_base58()
        self.stats.peer_id = self.peer_id
        steptrace.set_role(f"server-{self.peer_id[-6:]}")
        self.stats.visible_maddrs = await self._visible_maddrs(main_p2p, network)
        self._set_state("joining", "measuring throughput")
        self.throughput = await asyncio.to_thread(self._get_throughput)
        while not self._stop.is_set():
            start, end = await self._choose_blocks()
            moved = await self._serve(start, end, executor)
            if not moved:
                break
            logger.info("rebalancing: leaving blocks [%d, %d)", start, end)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stop.is_set():
            logger.warning("%s again: stopping now", name)
            self._force_exit(128 + sig)
        logger.info("%s: leaving the swarm (press Ctrl-C again to force)", name)
        self._stop.set()
        # A safety net if leaving in order hangs somewhere no timeout covers.
        timer = threading.Timer(SHUTDOWN_DEADLINE_S, self._force_exit, args=(128 + sig,))
        timer.daemon = True
        timer.start()

    def _force_exit(self, code: int) -> None:
        """Leave now: kill p2pd (and a DHT child's group) and exit without waiting for anything."""
        if self.dht is not None and self.dht.pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.dht.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                child.kill()
        self.stats.state, self.stats.state_reason = "offline", "forced to stop"
        with contextlib.suppress(Exception):
            self._write_stats()
        logging.shutdown()
        os._exit(code)

    # --- blocks ------------------------------------------------------------------------------------
    def _get_throughput(self) -> Throughput:
        value = self.config.throughput
        if isinstance(value, float):
            return Throughput(inference_rps=value, forward_rps=value, network_rps=value)
        cache = Path(self.config.throughput_cache) if self.config.throughput_cache else None
        key = (self.checkpoint, self.device, self.dtype, self.config.quant_type)
        if cache is not None and value != "eval":
            cached = cached_throughput(*key, cache)
            if cached is not None:
                return cached
        measured = measure(*key)
        self._unsaved_throughput = measured if cache is not None else None  # saved once the blocks load
        return measured

    def _save_throughput(self) -> None:
        measured, self._unsaved_throughput = self._unsaved_throughput, None
        if measured is not None:
            try:
                save_throughput(
                    self.checkpoint,
                    self.device,
                    self.dtype,
                    self.config.quant_type,
                    Path(self.config.throughput_cache),
                    measured,
                )
            except OSError as exc:
                logger.warning("could not save the throughput measurement: %s", one_line(exc))

    def _num_blocks_to_serve(self) -> int:
        if self.config.num_blocks is not None:
            return max(1, min(self.config.num_blocks, self.total_blocks))
        # As many blocks as fit in 80% of the free memory of the device, with their KV cache budget.
        estimate = estimate_memory(self.checkpoint, self.dtype, self.config.quant_type)
        per_block = max(estimate.per_block_bytes) + self.attn_cache_tokens * self.bytes_per_token_block
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = psutil.virtual_memory().available
        return max(1, min(self.total_blocks, int(0.8 * free // per_block)))

    def _uids(self, start: int, end: int) -> list[str]:
        return [protocol.make_uid(self.dht_prefix, i) for i in range(start, end)]

    async def _choose_blocks(self) -> tuple[int, int]:
        if self.config.blocks is not None:
            return self.config.blocks
        length = self._num_blocks_to_serve()
        # A random pause so servers starting together do not all pick the same weakest window.
        await asyncio.sleep(random.uniform(0, 2 * self.config.mean_block_selection_delay))
        infos = await get_module_infos(self.dht, self._uids(0, self.total_blocks))
        spans = compute_spans(infos, min_state=ServerState.JOINING)
        spans.pop(self.peer_id, None)
        return choose_best_blocks(length, spans.values(), self.total_blocks)

    async def _serve(self, start: int, end: int, executor: ThreadPoolExecutor) -> bool:
        """Serve [start, end) until asked to stop (returns False) or to move (returns True)."""
        self.stats.start_block, self.stats.end_block = start, end
        explicit = not isinstance(self.config.throughput, str)  # an explicit value is announced as given
        self.announced_throughput = (
            float(self.config.throughput)
            if explicit
            else self.throughput.announced(end - start, using_relay=self.stats.using_relay)
        )
        self.stats.throughput = self.announced_throughput
        if isinstance(self.config.throughput, str):
            self.stats.inference_rps, self.stats.forward_rps = (
                self.throughput.inference_rps,
                self.throughput.forward_rps,
            )
        self.state = ServerState.JOINING
        self._set_state("loading", f"loading blocks [{start}, {end})")
        await self._announce(start, end)
        handler: TransformerConnectionHandler | None = None
        tasks: list[asyncio.Task] = []
        move = asyncio.Event()
        try:  # from here on, leaving (also when cancelled while loading) says OFFLINE
            options = LoadOptions(
                device=self.device,
                dtype=self.dtype,
                quantization=self.config.quant_type,
                token=self.config.token,
                revision=self.config.revision,
                cache_dir=self.config.cache_dir,
            )
            self.span = await asyncio.to_thread(load_span, self.checkpoint, start, end, options)
            self.adapters = await asyncio.to_thread(load_adapters, self.span, self.config.adapters)
            self.stats.span_bytes = self.span.memory_bytes()
            self.budget = CacheBudget(
                max_bytes=(end - start) * self.attn_cache_tokens * self.bytes_per_token_block,
                bytes_per_token_block=self.bytes_per_token_block,
                max_alloc_timeout=self.config.max_alloc_timeout,
            )
            limits = HandlerLimits(
                inference_max_length=self.inference_max_length,
                max_batch_size=self.max_batch_size,
                max_open_sessions=self.config.max_open_sessions,
                request_timeout=self.config.request_timeout,
                session_timeout=self.config.session_timeout,
                step_timeout=self.config.step_timeout,
            )
            # What is alive now (torch, the model, hivemind: ~400k objects) lives as long as the span;
            # frozen, it is left out of the collector's full passes, each of which would otherwise walk
            # all of it (hundreds of ms) and stall every token step meanwhile. A flood of requests
            # makes such passes frequent.
            gc.collect()
            gc.freeze()
            self._save_throughput()
            first = True
            while True:
                handler = TransformerConnectionHandler(
                    self.span, self.dht_prefix, self.budget, limits, self.stats, executor
                )
                handler.adapters = self.adapters
                handler.dht = self.dht  # push_stream.py: which peers are Corolla servers
                handler.dial_direct = self.config.direct_links  # push streams over direct links too
                if self.config.direct_links:
                    bind = direct_bind_host(self.config.host_maddrs)
                    visible = [str(m) for m in self.stats.visible_maddrs]
                    hosts = same_family(advertised_hosts(self.config.host_maddrs, visible), bind)
                    if hosts:
                        handler.direct_link_at = (bind, self.config.direct_link_port, hosts)
                p2p = await self.dht.replicate_p2p()
                await handler.attach(p2p)
                self.next_pings = NextPings(p2p, self.peer_id)
                self.state = ServerState.ONLINE
                self._set_state("online", f"serving blocks {start}–{end - 1}")
                if first:
                    for maddr in self.stats.visible_maddrs:
                        print(
                            f"corolla: serving {self.dht_prefix}; others join with --initial-peers {maddr}", flush=True
                        )
                    first = False
                tasks.append(asyncio.create_task(self._announce_forever(start, end)))
                if self.config.initial_peers:
                    tasks.append(asyncio.create_task(self._rejoin_forever()))
                if self.config.blocks is None:
                    tasks.append(asyncio.create_task(self._balance_forever(move)))
                tasks.append(asyncio.create_task(self._watch_members_forever(None if self.config.blocks else move)))
                stop_wait = asyncio.create_task(self._stop.wait())
                move_wait = asyncio.create_task(move.wait())
                pause_wait = asyncio.create_task(self._paused.wait())
                tasks += [stop_wait, move_wait, pause_wait]
                await asyncio.wait({stop_wait, move_wait, pause_wait}, return_when=asyncio.FIRST_COMPLETED)
                if self._stop.is_set() or move.is_set():
                    break
                # Paused, keeping the blocks loaded: OFFLINE for the swarm and no handlers until resumed.
                for task in tasks:
                    task.cancel()
                tasks = []
                await self._go_quiet(start, end, handler)
                handler = None
                self._set_state("paused", "paused; the blocks stay loaded")
                resume_wait = asyncio.create_task(self._resumed.wait())
                stop_wait = asyncio.create_task(self._stop.wait())
                tasks += [resume_wait, stop_wait]
                await asyncio.wait({resume_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    task.cancel()
                tasks = []
                if self._stop.is_set():
                    break
        finally:
            for task in tasks:
                task.cancel()
            await self._leave(start, end, handler)
        return move.is_set() and not self._stop.is_set()

    async def _leave(self, start: int, end: int, handler: TransformerConnectionHandler | None) -> None:
        """Say OFFLINE on the DHT and stop serving; each part bounded, none allowed to raise."""
        self._set_state("leaving", "announcing OFFLINE")
        await self._go_quiet(start, end, handler)
        self.span = self.budget = None
        gc.unfreeze()  # the old span's objects may hold cycles: let the collector see them again
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    async def _go_quiet(self, start: int, end: int, handler: TransformerConnectionHandler | None) -> None:
        """OFFLINE on the DHT and the RPC handlers removed (open sessions end: their clients move on)."""
        self.state = ServerState.OFFLINE
        try:
            await asyncio.wait_for(self._announce(start, end), timeout=ANNOUNCE_OFFLINE_TIMEOUT_S)
        except Exception as exc:  # p2pd already gone (a signal to the whole group), or the DHT is stuck
            logger.warning("could not announce OFFLINE: %s", one_line(exc))
        if handler is not None:
            try:
                await asyncio.wait_for(handler.detach(), timeout=DETACH_TIMEOUT_S)
            except Exception as exc:
                logger.warning("could not remove the RPC handlers: %s", one_line(exc))

    def _on_pause(self, pause: bool) -> None:
        """SIGUSR1 pauses serving while keeping the blocks loaded; SIGUSR2 resumes (the node's Pause)."""
        logger.info("%s", "pausing (the blocks stay loaded)" if pause else "resuming")
        if pause and getattr(self, "_chat_listener", None) is not None:
            self._chat_listener.drop_client()  # a chat client must not wait on this paused server
        (self._paused if pause else self._resumed).set()
        (self._resumed if pause else self._paused).clear()

    # --- announcements -----------------------------------------------------------------------------

    async def _stop_when_orphaned(self, parent: int) -> None:
        """Stop once the starting process is gone (also when it was gone before this watch began)."""
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        logger.warning("the process that started this server is gone; stopping")
        self._stop.set()

    # --- reachability ------------------------------------------------------------------------------

    # --- stats -------------------------------------------------------------------------------------
    def _set_state(self, state: str, reason: str) -> None:
        self.stats.state, self.stats.state_reason = state, reason
        logger.info("%s: %s", state, reason)
        self._write_stats()

    def _write_stats(self) -> None:
        if self._stats_file is not None:
            self._stats_file.write(self._stats_snapshot())

    def _stats_snapshot(self) -> tuple[int, dict]:
        if self.budget is not None:
            self.stats.cache_bytes_total = self.budget.max_bytes
            self.stats.cache_bytes_left = self.budget.bytes_left
        return self._stats_file.take(self.stats)

    async def _write_stats_forever(self) -> None:
        """Every second: the snapshot taken on the loop (the counters change there), the file written on a
        thread (a busy disk must not hold up token steps)."""
        while True:
            if self._stats_file is not None:
                await asyncio.to_thread(self._stats_file.write, self._stats_snapshot())
            await asyncio.sleep(1.0)


def shared_swarm(dht, p2p, initial_peers) -> SharedSwarm:
    """What this server lends its chat engine: its DHT, its handlers (registered on `p2p`, the P2P of this
    loop) for in-process calls, and the peer ids its swarm is known by."""
    ids = {peer_id_of(str(peer)) for peer in initial_peers} | {p2p.peer_id.to_base58()}
    return SharedSwarm(dht, LocalServer(p2p), frozenset(ids - {None}))


def network_plan_arguments(config: ServerConfig) -> dict:
    """What `plan_network` needs from a server's configuration."""
    return dict(
        initial_peers=config.initial_peers,
        host_maddrs=config.host_maddrs,
        announce_maddrs=config.announce_maddrs,
        identity_path=config.identity_path,
        mode=config.reachability,
        use_relay=config.use_relay,
        nat_port_map=config.nat_port_map,
    )


def serve(config: ServerConfig, early_plan: PlanInBackground | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_file_limit()  # before p2pd starts, which inherits it: open_files.py says why
    try:
        server = BlockServer(config, early_plan)
    except BaseException:
        if early_plan is not None:
            early_plan.cancel()  # e.g. the model cannot be opened: no check left running
        raise
    code = server.run()
    # Everything is cleaned up (OFFLINE said, DHT and p2pd gone, stats written). Leave now: a thread
    # still loading weights when a signal came would hold the interpreter's exit until it finished,
    # and finalizing torch and hivemind objects takes seconds more (measured: ~6 s of garbage
    # collection after Ctrl-C).
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
