"""``locod start``: one site's daemon, from start-up to a clean stop.

Start-up order matters: the DHT (its own process) starts before any gRPC object exists,
since gRPC and fork do not mix; the run config is settled (published by the first peer,
adopted by joiners) before the model is built; state is restored from the checkpoint, or
downloaded from live peers by a newcomer, before the first step.

Training runs in this (main) thread; the network thread runs the gRPC server, the rounds
and the DHT refresh. SIGINT/SIGTERM stop the daemon within seconds: rounds in flight are
abandoned, a checkpoint is written atomically, the peer says it leaves, and the DHT and
server shut down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import torch

from locod.daemon.allreduce import Reducer
from locod.daemon.averager import GrpcAverager
from locod.daemon.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from locod.daemon.config import DaemonConfig, adopt_run_config, parse_host_port
from locod.daemon.context import PeerContext
from locod.daemon.discovery import Discovery, PeerRecord, load_or_create_key, start_dht
from locod.daemon.faults import FaultPlan
from locod.daemon.live import LiveView
from locod.daemon.matchmaking import GroupRegistry, Matchmaker
from locod.daemon.network import NetworkThread, start_server
from locod.daemon.resolve import ResolveError, resolve_joins
from locod.daemon.rpc import peer_pb2 as pb
from locod.daemon.rpc import peer_pb2_grpc
from locod.daemon.service import PeerService
from locod.daemon.state_transfer import (
    DownloadError,
    Progress,
    Snapshot,
    StateServer,
    download_state,
    tensor_bytes,
)
from locod.daemon.status import FragmentFigures, StatusBoard, StatusService
from locod.peer.averaging import FragmentState
from locod.peer.data import BatchSampler, Corpus, CorpusError, heldout_batches, load_corpus
from locod.peer.fragments import assign_flat, next_sync_step, partition
from locod.peer.inner import InnerTrainer, evaluate
from locod.peer.model import ByteTransformer, build_model, model_config
from locod.peer.streaming import StreamingDiLoCo

REFRESH_S = 5.0
INFO_FILE = "daemon.json"


class StartError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("locod")
    except PackageNotFoundError:
        return "0+unknown"


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """One daemon per state dir: a second one gets a clear error, not a corrupt checkpoint."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_path = state_dir / "lock"
    handle = lock_path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StartError(
            f"state dir {state_dir} is in use by locod pid {holder}; "
            "give this daemon its own --state-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        handle.close()


def outward_host() -> str:
    """This machine's address as others would dial it (best guess; --announce overrides)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
        host = probe.getsockname()[0]
    except OSError:
        host = "127.0.0.1"
    finally:
        probe.close()
    return host


def setup_logging(cfg: DaemonConfig, console: bool) -> logging.Logger:
    log = logging.getLogger("locod")
    log.setLevel(cfg.log_level.upper())
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    file_handler = logging.FileHandler(cfg.state_dir / "locod.log")
    file_handler.setFormatter(formatter)
    log.addHandler(file_handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        stream.setLevel(max(logging.INFO, log.level))
        log.addHandler(stream)
    return log


class Daemon:
    """One peer: model, data, outer loop, network, status, checkpoints."""

    def __init__(self, cfg: DaemonConfig, *, out: TextIO | None = None) -> None:
        self.cfg = cfg
        self.out = out or sys.stdout
        self.stop_event = threading.Event()
        self.board = StatusBoard()
        self.network = NetworkThread()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="locod-codec")
        self.dht: Any = None
        self.discovery: Discovery | None = None
        self.server: Any = None
        self.ctx: PeerContext | None = None
        self.averager: GrpcAverager | None = None
        self.registry: GroupRegistry | None = None
        self.worker: StreamingDiLoCo | None = None
        self.trainer: InnerTrainer | None = None
        self.sampler: BatchSampler | None = None
        self.step = 0
        self.tokens = 0
        self.log = logging.getLogger("locod")
        self.view: LiveView | None = None
        self._refresh_task: concurrent.futures.Future[None] | None = None
        self._signals = 0
        self._told_client_only: set[str] = set()
        self._ready = False

    # -- entry point ---------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        with state_dir_lock(cfg.state_dir):
            self.view = LiveView(enabled=cfg.live)
            self.log = setup_logging(cfg, console=not self.view.interactive)
            self.log.info(
                "locod %s starting; effective config: %s",
                package_version(),
                json.dumps(cfg.loggable(), sort_keys=True, default=str),
            )
            self._install_signals()
            try:
                self._start()
                self._train()
            finally:
                self._shutdown()
        return 0

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self._signals += 1
            if self._signals > 1:
                os._exit(130)  # a second Ctrl-C: the user means it
            self.log.info("received %s: stopping", signal.Signals(signum).name)
            self.stop_event.set()
            if self.averager is not None:
                self.averager.abandon_all()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # -- start-up ------------------------------------------------------------------------

    def _start(self) -> None:
        corpus, device = self._load_corpus()
        dht_addrs = self._start_dht()
        checkpoint = self._read_checkpoint()
        self.cfg = self._settle_run_config(checkpoint)
        self._build_training(corpus, device)
        listen_address = self._start_network(dht_addrs)
        self._settle_state(checkpoint)
        ctx, cfg, view = self.ctx, self.cfg, self.view
        assert ctx is not None and view is not None
        local = listen_address.replace("0.0.0.0:", "127.0.0.1:")
        view.message(
            f"locod: peer {ctx.peer_id} in run {cfg.run_name!r}; gRPC "
            f"{ctx.address or '(client-only)'}; status: locod status {local}"
        )
        if not cfg.join:
            join_command = self.board.join_command
            view.message(f"locod: another site joins this run with:\n  {join_command}")
            print(f"JOIN {join_command}", file=self.out, flush=True)
        self._wait_for_peers()

    def _load_corpus(self) -> tuple[Corpus, torch.device]:
        cfg = self.cfg
        try:
            corpus = load_corpus(cfg.data or None, cache_dir=cfg.cache_dir)
        except CorpusError as error:
            raise StartError(str(error)) from error
        self.log.info("corpus: %s", corpus.description)
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise StartError(f"--device {cfg.device}: CUDA is not available on this machine")
        return corpus, device

    def _start_dht(self) -> list[str]:
        """Start (or join) the DHT; returns the multiaddrs others can --join."""
        cfg = self.cfg
        key = load_or_create_key(cfg.state_dir / "identity.der")
        self.board.update(state="joining DHT")
        try:
            initial_peers = resolve_joins(cfg.join, cfg.connect_timeout_s)
        except ResolveError as error:
            raise StartError(str(error)) from error
        try:
            self.dht, owner = start_dht(
                initial_peers=initial_peers,
                host_maddrs=[cfg.dht_listen],
                key=key,
                announce_maddrs=[cfg.dht_announce] if cfg.dht_announce else None,
            )
        except Exception as error:  # hivemind raises many kinds; the message is what counts
            raise StartError(
                f"cannot start the DHT on {cfg.dht_listen}"
                + (f" joining {', '.join(cfg.join)}" if cfg.join else "")
                + f": {error}"
            ) from error
        self.discovery = Discovery(self.dht, cfg.run_name, owner)
        return [str(a) for a in self.dht.get_visible_maddrs()]

    def _build_training(self, corpus: Corpus, device: torch.device) -> None:
        """Model, optimizer, fragments, data stream, outer state, evaluation copy."""
        cfg = self.cfg
        assert self.discovery is not None
        model = build_model(model_config(cfg.run.model), seed=cfg.run.seed)
        self.trainer = InnerTrainer(model, cfg.inner, device=device)
        fragments = partition(model, list(model.blocks), cfg.run.fragments, cfg.run.layout)
        # Every peer samples its own stream: the seed mixes in its identity.
        self.sampler = BatchSampler(
            corpus.train,
            batch_size=cfg.inner.batch_size,
            seq_len=cfg.inner.seq_len,
            seed=int(self.discovery.peer_id[:8], 16),
        )
        self.eval_set = heldout_batches(
            corpus.heldout,
            batch_size=cfg.inner.batch_size,
            seq_len=cfg.inner.seq_len,
            num_batches=cfg.eval_batches,
        )
        self.eval_model: ByteTransformer = copy.deepcopy(model)
        self.eval_fragments = partition(
            self.eval_model, list(self.eval_model.blocks), cfg.run.fragments, cfg.run.layout
        )
        # The averager comes with the network; the state can be served before that.
        self.worker = StreamingDiLoCo(fragments, cfg.outer, _NoAverager(), log=self.log.info)

    def _start_network(self, dht_addrs: list[str]) -> str:
        """The network thread, the gRPC server, the averager, our DHT record."""
        cfg, worker, discovery = self.cfg, self.worker, self.discovery
        assert worker is not None and discovery is not None
        self.network.start()
        self.ctx = ctx = PeerContext(
            cfg=cfg,
            peer_id=discovery.peer_id,
            address="",
            config_hash=cfg.run.hash,
            version=package_version(),
            log=self.log,
            executor=self.executor,
            faults=FaultPlan.parse(cfg.faults),
            dht_addrs=dht_addrs,
            client_only=cfg.client_only,
        )
        wire = cfg.outer.wire
        reducer = Reducer(ctx, [f.numel for f in worker.fragments], wire, cfg.outer.clip_factor)
        self.registry = GroupRegistry(ctx, reducer.register_soon)
        state_server = StateServer(ctx, self._snapshot, lambda: worker.version)
        service = PeerService(ctx, self.registry, reducer, state_server, cfg.run.fragments)
        status = StatusService(self.board, ctx)
        try:
            self.server, port = self.network.call(start_server(cfg, service, status), 30)
        except (OSError, RuntimeError) as error:
            raise StartError(f"cannot serve gRPC on {cfg.listen}: {error}") from error
        host, _ = parse_host_port(cfg.listen, "listen")
        if cfg.announce:
            ctx.address = cfg.announce
        elif not cfg.client_only:
            ctx.address = f"{outward_host() if host in ('0.0.0.0', '::', '') else host}:{port}"
        listen_address = f"{host}:{port}"
        self.averager = GrpcAverager(
            ctx,
            self.network.loop,
            Matchmaker(ctx, self.registry),
            reducer,
            wire,
            repair=self._repair,
        )
        worker.averager = self.averager
        self.board.update(dht_addrs=dht_addrs, join_command=self._join_command(dht_addrs))
        self._write_info(listen_address, dht_addrs)
        self._publish(first=True)
        discovery.publish_config(cfg.run.as_dict())
        self._refresh_task = self.network.submit(self._refresh_loop())
        return listen_address

    def _settle_state(self, checkpoint: dict[str, Any] | None) -> None:
        """Where training starts: the checkpoint, the run's current state, or scratch."""
        cfg = self.cfg
        if cfg.join and not cfg.client_only:
            self._check_reachable()
        if checkpoint is not None:
            self._restore(checkpoint)
            if cfg.join:
                # Back after a restart: the run moved on. Take its current outer state (the
                # inner optimizer and the data position are kept) before contributing (I5).
                self._download(required=False)
        elif cfg.join:
            self._download()

    def _check_reachable(self) -> None:
        """Ask a peer to dial us back; if nobody can, take part client-only (behind NAT)."""
        ctx = self.ctx
        assert ctx is not None
        self._refresh_now()
        others = [r for r in ctx.live_peers() if r.peer_id != ctx.peer_id and r.address]
        if not others:
            return

        async def ask(address: str) -> bool:
            stub = peer_pb2_grpc.PeerStub(ctx.channel(address))
            request = pb.DialBackRequest(run=self.cfg.run_name, address=ctx.address)
            try:
                reply = await stub.DialBack(request, timeout=2 * self.cfg.connect_timeout_s)
            except Exception:
                return False
            return bool(reply.reachable)

        async def ask_some() -> bool:
            answers = await asyncio.gather(*(ask(r.address) for r in others[:3]))
            return any(answers)

        if self.network.call(ask_some(), timeout_s=4 * self.cfg.connect_timeout_s + 5):
            return
        self.log.warning(
            "no peer could connect back to %s: taking part client-only (this peer sends and "
            "receives over connections it opens, and reduces nothing). To be reachable, "
            "start with --listen HOST:PORT --announce PUBLIC_HOST:PORT and open that port.",
            ctx.address,
        )
        ctx.client_only = True
        ctx.address = ""
        self._publish()

    def _read_checkpoint(self) -> dict[str, Any] | None:
        try:
            return load_checkpoint(self.cfg.state_dir)
        except CheckpointError as error:
            aside = self.cfg.state_dir / f"checkpoint.corrupt-{int(time.time())}.pt"
            (self.cfg.state_dir / "checkpoint.pt").rename(aside)
            self.log.error("%s; moved it to %s and starting without it", error, aside)
            return None

    def _settle_run_config(self, checkpoint: dict[str, Any] | None) -> DaemonConfig:
        """Joiners adopt the run's config (refusing contradictions); restarts keep theirs."""
        assert self.discovery is not None
        cfg = self.cfg
        if cfg.join:
            run = None
            deadline = time.monotonic() + 4 * cfg.connect_timeout_s
            while run is None and time.monotonic() < deadline:
                run = self.discovery.run_config()
                if run is None:
                    time.sleep(0.5)
            if run is None:
                raise StartError(
                    f"no run named {cfg.run_name!r} was found through "
                    f"{', '.join(cfg.join)}; check --run and --join"
                )
            try:
                cfg = adopt_run_config(cfg, run)
            except Exception as error:  # click.UsageError: the message is the point
                raise StartError(str(getattr(error, "message", error))) from error
        if checkpoint is not None and checkpoint.get("run_config") != cfg.run.as_dict():
            raise StartError(
                f"the checkpoint in {cfg.state_dir} belongs to a run with config "
                f"{checkpoint.get('run_config')}, not {cfg.run.as_dict()}; use another "
                "--state-dir or the run's settings"
            )
        return cfg

    def _join_command(self, dht_addrs: list[str]) -> str:
        usable = [a for a in dht_addrs if "/127.0.0.1/" not in a] or dht_addrs
        parts = ["locod start", f"--run {self.cfg.run_name}"]
        parts += [f"--join {a}" for a in usable[:1]]
        if self.cfg.key:
            parts.append("--key <the run key>")
        return " ".join(parts)

    def _write_info(self, listen: str, dht_addrs: list[str]) -> None:
        assert self.ctx is not None
        info = {
            "pid": os.getpid(),
            "peer_id": self.ctx.peer_id,
            "run": self.cfg.run_name,
            "listen": listen,
            "address": self.ctx.address,
            "dht_addrs": dht_addrs,
        }
        temp = self.cfg.state_dir / (INFO_FILE + ".tmp")
        temp.write_text(json.dumps(info))
        temp.replace(self.cfg.state_dir / INFO_FILE)

    def _record(self, *, left: bool = False) -> PeerRecord:
        assert self.ctx is not None
        return PeerRecord(
            peer_id=self.ctx.peer_id,
            address=self.ctx.address,
            client_only=self.ctx.client_only,
            version=self.ctx.version,
            config_hash=self.ctx.config_hash,
            step=self.step,
            tokens_per_s=self.board.tokens_per_s,
            joined_at=self.ctx.joined_at,
            left=left,
            ready=self._ready,
        )

    def _publish(self, *, first: bool = False, left: bool = False) -> None:
        assert self.discovery is not None and self.ctx is not None
        record = self._record(left=left)
        self.discovery.publish(record)
        if first:
            self.ctx.peers[record.peer_id] = record

    async def _refresh_loop(self) -> None:
        """Keep our record fresh and our view of the run current."""
        assert self.discovery is not None and self.ctx is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self._publish)
                await loop.run_in_executor(None, self._refresh_now)
            except Exception as error:
                self.log.warning("DHT refresh failed: %s", error)
            await asyncio.sleep(REFRESH_S)

    def _refresh_now(self) -> None:
        """Read the run's live peers from the DHT into the shared view."""
        assert self.discovery is not None and self.ctx is not None
        peers = self.discovery.peers()
        view = {r.peer_id: r for r in peers if not self.ctx.has_left(r)}
        view[self.ctx.peer_id] = self._record()  # our own view of ourselves is the freshest
        for record in view.values():
            if record.client_only and record.peer_id not in self._told_client_only:
                self._told_client_only.add(record.peer_id)
                if record.peer_id != self.ctx.peer_id:
                    self.log.info(
                        "peer %s takes part client-only (it cannot accept connections): it "
                        "contributes but reduces nothing. To make it reachable, start it with "
                        "--listen HOST:PORT --announce PUBLIC_HOST:PORT and open that port.",
                        record.peer_id,
                    )
        self.ctx.peers = self.ctx.with_heard(view)

    def _wait_for_peers(self) -> None:
        """Say we are ready; with --min-peers N, wait until N peers are ready to train.

        Counting only ready peers (not ones still downloading the state) lets a run's
        first peers start their first round together.
        """
        self._ready = True
        self._publish()
        if self.cfg.min_peers <= 1:
            return
        self.board.update(state="waiting", note=f"waiting for {self.cfg.min_peers} peers")
        while not self.stop_event.is_set():
            self._refresh_now()
            assert self.ctx is not None
            count = sum(1 for r in self.ctx.live_peers() if r.ready)
            self.board.update(note=f"{count}/{self.cfg.min_peers} peers ready")
            if self.view:
                self.view.update(self.board, self.ctx)
            if count >= self.cfg.min_peers:
                break
            self.stop_event.wait(0.3)
        self.board.update(note="")

    # -- state: snapshot, restore, download, repair --------------------------------------

    def _snapshot(self, fragments: list[int]) -> Snapshot:
        """A consistent copy of the outer state (called from the network side)."""
        worker = self.worker
        assert worker is not None
        wanted = fragments or list(range(worker.num_fragments))
        with worker.lock:
            tensors = {}
            for p in wanted:
                tensors[f"global/{p}"] = tensor_bytes(worker.global_params[p])
                tensors[f"momentum/{p}"] = tensor_bytes(worker.momentum[p])
            rounds = [
                worker.stats.last[p].round if p in worker.stats.last else -1
                for p in range(worker.num_fragments)
            ]
            hashes = [worker.global_hash(p) for p in range(worker.num_fragments)]
            version = worker.version
        return Snapshot(
            version=version,
            step=self.step,
            rounds=rounds,
            global_hashes=hashes,
            config_json=json.dumps(self.cfg.run.as_dict()),
            tensors=tensors,
        )

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        assert self.trainer is not None and self.worker is not None and self.sampler is not None
        self.trainer.model.load_state_dict(checkpoint["model"])
        self.trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        self.trainer.step = int(checkpoint["inner_step"])
        self.worker.load_state_dict(checkpoint["outer"])
        self.sampler.load_state_dict(checkpoint["sampler"])
        self.step = int(checkpoint["step"])
        self.tokens = int(checkpoint["tokens"])
        self.log.info("resumed from the checkpoint at step %d", self.step)

    def _download(self, *, required: bool = True) -> bool:
        """Take the run's outer state (and step) from live peers, then θ ← θ_g.

        A newcomer must (``required``); a restarted or far-behind peer tries, and keeps what
        it has if nobody can serve it.
        """
        assert self.ctx is not None and self.worker is not None
        previous_state = self.board.state
        self.board.update(state="downloading state")
        self._refresh_now()
        donors = [
            r.address for r in self.ctx.live_peers() if r.peer_id != self.ctx.peer_id and r.address
        ]
        if not donors:
            if not required:
                self.log.warning("no peer to take the run's state from; keeping this peer's")
                self.board.update(state=previous_state)
                return False
            raise StartError(
                "no live peer with a reachable address to download the state "
                "from; is the run still going?"
            )
        progress = Progress()
        ctx = self.ctx

        async def fetch() -> Any:
            task = asyncio.ensure_future(download_state(ctx, donors, progress=progress))
            while not task.done():
                self.board.update(
                    download_done=progress.done,
                    download_total=progress.total,
                    note=f"{progress.rate / 1e6:.1f} MB/s, {progress.eta_s:.0f}s left"
                    if progress.total
                    else "asking donors",
                )
                if self.view is not None and self.ctx is not None:
                    self.view.update(self.board, self.ctx)
                await asyncio.sleep(0.2)
            self.board.update(note="")
            return task.result()

        try:
            downloaded = self.network.call(fetch(), timeout_s=None)
        except DownloadError as error:
            if not required:
                self.log.warning("state download failed (%s); keeping this peer's state", error)
                self.board.update(state=previous_state)
                return False
            raise StartError(f"state download failed: {error}") from error
        before = self.step
        self._adopt_download(downloaded.manifest, downloaded.tensors)
        self.board.update(
            download_done=progress.done, download_total=progress.total, state=previous_state
        )
        self.log.info(
            "downloaded %d bytes of state from %s in %.2fs (%.1f MB/s); step %d → %d",
            progress.done,
            ", ".join(downloaded.donors_used),
            time.monotonic() - progress.started,
            progress.rate / 1e6,
            before,
            self.step,
        )
        return True

    def _adopt_download(self, manifest: pb.StateManifest, tensors: dict[str, torch.Tensor]) -> None:
        worker = self.worker
        assert worker is not None
        for p in range(worker.num_fragments):
            worker.adopt(
                p,
                FragmentState(
                    global_params=tensors[f"global/{p}"], momentum=tensors[f"momentum/{p}"]
                ),
            )
            worker.mark_round(p, int(manifest.rounds[p]))
        worker.reset_local_to_global()
        self.step = int(manifest.step)

    async def _repair(
        self, fragment: int, round_index: int, majority_hash: str
    ) -> tuple[FragmentState, bool] | None:
        """Fetch the group's state of one fragment from a peer that holds it (I3)."""
        assert self.ctx is not None
        donors = [
            r.address for r in self.ctx.live_peers() if r.peer_id != self.ctx.peer_id and r.address
        ]
        for donor in donors:
            try:
                got = await download_state(self.ctx, [donor], fragments=[fragment])
            except DownloadError as error:
                self.log.info(
                    "repair of fragment %d: %s could not serve it: %s", fragment, donor, error
                )
                continue
            state = FragmentState(
                global_params=got.tensors[f"global/{fragment}"],
                momentum=got.tensors[f"momentum/{fragment}"],
            )
            if got.manifest.global_hashes[fragment] == majority_hash:
                self.log.info(
                    "repair of fragment %d: took the group's state from %s", fragment, donor
                )
                return state, False
            if got.manifest.rounds[fragment] == round_index:
                self.log.info(
                    "repair of fragment %d: took the post-round state from %s", fragment, donor
                )
                return state, True
            self.log.info(
                "repair of fragment %d: %s holds %s after round %d, neither the group's %s "
                "nor round %d",
                fragment,
                donor,
                got.manifest.global_hashes[fragment],
                got.manifest.rounds[fragment],
                majority_hash,
                round_index,
            )
        return None

    # -- training ------------------------------------------------------------------------

    def _train(self) -> None:
        cfg = self.cfg
        trainer, worker, sampler, ctx = self.trainer, self.worker, self.sampler, self.ctx
        assert trainer is not None and worker is not None and sampler is not None
        assert ctx is not None and self.view is not None
        self.board.update(state="training", note="")
        tokens_per_step = cfg.inner.tokens_per_step
        last_checkpoint = time.monotonic()
        training_began = time.monotonic()
        rate_window: list[tuple[float, int]] = []
        step_delay_s = ctx.faults.step_delay_s()
        loss = float("nan")
        while not self.stop_event.is_set() and not (cfg.max_steps and self.step >= cfg.max_steps):
            if step_delay_s:
                time.sleep(step_delay_s)  # fault injection: a slower machine
            inputs, targets = sampler.next()
            loss = trainer.train_step(inputs, targets)
            if not math.isfinite(loss):
                self.log.error(
                    "training loss is %s at step %d; skipping the outer sync of this step",
                    loss,
                    self.step + 1,
                )
            self.step += 1
            self.tokens += tokens_per_step
            ctx.step = self.step
            worker.add_tokens(tokens_per_step)
            worker.prepare(self.step)
            for p in worker.perform(self.step):
                self._maybe_perturb(p)
            now = time.monotonic()
            rate_window = [(t, s) for t, s in rate_window if now - t < 30] + [(now, self.tokens)]
            if self.averager is not None and self.averager.behind_s > 0:
                behind, self.averager.behind_s = self.averager.behind_s, 0.0
                self._catch_up(behind, rate_window)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._evaluate()
            self._publish_figures(loss, rate_window, now - training_began)
            self.view.update(self.board, ctx)
            if cfg.checkpoint_every_s and now - last_checkpoint > cfg.checkpoint_every_s:
                self._checkpoint()
                last_checkpoint = now
        if not self.stop_event.is_set():
            worker.drain(self.step)
            if cfg.eval_every:
                self._evaluate()
            self._publish_figures(loss, rate_window, time.monotonic() - training_began)
            self._checkpoint()
            self.log.info("reached --max-steps %d", cfg.max_steps)
            if cfg.linger:
                self.board.update(state="finished", note="serving until stopped")
                self.view.update(self.board, ctx, force=True)
                while not self.stop_event.wait(1.0):
                    self.view.update(self.board, ctx)

    def _catch_up(self, behind_s: float, rate_window: list[tuple[float, int]]) -> None:
        """Skip the step counter ahead after coming late to a group.

        A peer that keeps arriving after its groups closed never contributes. It leaps
        forward by the steps it is behind, but never past the next scheduled sync, so no
        round is skipped; a few late rounds bring it back within the matchmaking window.
        """
        (t0, k0), (t1, k1) = rate_window[0], rate_window[-1]
        if t1 <= t0 or k1 <= k0:
            return
        step_s = (t1 - t0) / ((k1 - k0) / self.cfg.inner.tokens_per_step)
        behind_steps = int(behind_s / step_s)
        room = (
            next_sync_step(self.step, self.cfg.run.fragments, self.cfg.run.inner_steps)
            - self.step
            - 1
        )
        if behind_steps > self.cfg.run.inner_steps:
            # Far behind: leaping one round at a time would take many late rounds. Take the
            # run's state and step instead of dragging its rounds.
            self.log.info(
                "%.1fs (%d steps) behind the run: taking its current state", behind_s, behind_steps
            )
            if self._download(required=False):
                return
        leap = min(behind_steps, room)
        if leap > 0:
            self.step += leap
            self.log.info(
                "caught up %d step(s) (%.1fs behind the group) to step %d",
                leap,
                behind_s,
                self.step,
            )

    def _maybe_perturb(self, fragment: int) -> None:
        """Fault injection: damage this peer's θ_g[fragment] after a round (tests of I3)."""
        worker, ctx = self.worker, self.ctx
        assert worker is not None and ctx is not None
        record = worker.stats.last.get(fragment)
        if record is not None and ctx.faults.active("perturb-global", fragment, record.round):
            self.log.warning(
                "fault injected: perturbing θ_g of fragment %d after round %d",
                fragment,
                record.round,
            )
            with worker.lock:
                worker.global_params[fragment] += 1e-3

    def _evaluate(self) -> None:
        worker = self.worker
        assert worker is not None and self.trainer is not None
        with worker.lock:
            for fragment, global_params in zip(
                self.eval_fragments, worker.global_params, strict=True
            ):
                assign_flat(fragment.params, global_params)
        loss = evaluate(self.eval_model, self.eval_set, self.trainer.device)
        with self.board.lock:
            self.board.eval_loss = loss
            self.board.evals.append((self.step, round(loss, 4)))
        self.log.info("step %d: eval loss of the outer parameters %.4f", self.step, loss)

    def _publish_figures(
        self, loss: float, rate_window: list[tuple[float, int]], training_s: float
    ) -> None:
        worker = self.worker
        assert worker is not None
        (t0, k0), (t1, k1) = (rate_window[0], rate_window[-1]) if rate_window else ((0, 0), (0, 0))
        stats = worker.stats
        fragments = []
        for p, fragment in enumerate(worker.fragments):
            record = stats.last.get(p)
            fragments.append(
                FragmentFigures(
                    index=p,
                    round=record.round if record else -1,
                    global_hash=worker.global_hash(p),
                    group_size=record.group_size if record else 0,
                    duration_s=record.duration_s if record else 0.0,
                    outcome=record.outcome if record else "none",
                    numel=fragment.numel,
                )
            )
        self.board.update(
            step=self.step,
            tokens=self.tokens,
            tokens_per_s=(k1 - k0) / (t1 - t0) if t1 > t0 else 0.0,
            train_loss=loss,
            rounds_applied=stats.rounds_applied,
            rounds_failed=stats.rounds_failed,
            rounds_skipped=stats.rounds_skipped,
            repairs=stats.repairs,
            waited_s=stats.wait_s,
            training_s=training_s,
            fragments=fragments,
            rounds=[
                (r.fragment, r.round, r.group_size, r.duration_s, r.outcome)
                for r in list(stats.history)[-200:]
            ],
        )

    def _checkpoint(self) -> None:
        trainer, worker, sampler = self.trainer, self.worker, self.sampler
        if trainer is None or worker is None or sampler is None:
            return
        with worker.lock:
            payload = {
                "run_config": self.cfg.run.as_dict(),
                "step": self.step,
                "tokens": self.tokens,
                "inner_step": trainer.step,
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "outer": worker.state_dict(),
                "sampler": sampler.state_dict(),
            }
        try:
            size = save_checkpoint(self.cfg.state_dir, payload)
        except CheckpointError as error:
            self.log.error("%s", error)
            return
        self.log.info("checkpoint at step %d written (%d bytes)", self.step, size)

    # -- shutdown ------------------------------------------------------------------------

    def _shutdown(self) -> None:
        began = time.monotonic()
        self.board.update(state="stopping")
        if self.averager is not None:
            self.averager.abandon_all()
        if self.worker is not None and self.stop_event.is_set():
            self._checkpoint()
        if self.ctx is not None and self.network.loop.is_running():
            with contextlib.suppress(Exception):
                self.network.call(self._leave(), timeout_s=3)
        if self.discovery is not None and self.ctx is not None:
            with contextlib.suppress(Exception):
                self._publish(left=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.network.call(self.server.stop(grace=1.0), timeout_s=3)
        self.network.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.dht is not None:
            with contextlib.suppress(Exception):
                self.dht.shutdown()
        self.log.info("stopped in %.1fs", time.monotonic() - began)
        for handler in list(self.log.handlers):
            handler.flush()

    async def _leave(self) -> None:
        """Tell every known peer we are gone, so they leave us out of the next round."""
        ctx = self.ctx
        assert ctx is not None
        if self.registry is not None:
            self.registry.close_all()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        notice = pb.LeaveNotice(run=self.cfg.run_name, peer_id=ctx.peer_id)

        async def tell(address: str) -> None:
            stub = peer_pb2_grpc.PeerStub(ctx.channel(address))
            with contextlib.suppress(Exception):
                await stub.Leave(notice, timeout=1.0)

        await asyncio.gather(
            *(tell(r.address) for r in ctx.live_peers() if r.peer_id != ctx.peer_id and r.address)
        )
        await ctx.close_channels()


class _NoAverager:
    """Placeholder until the network side is up; no round can start before it."""

    def start(self, request: Any) -> None:
        raise RuntimeError("the network is not started")

    def result(self, fragment: int, round_index: int, timeout_s: float) -> None:
        return None

    def abandon(self, fragment: int, round_index: int) -> None:
        return None


def read_info(state_dir: Path) -> dict[str, Any] | None:
    """What a running daemon wrote about itself in its state dir (for ``locod status``)."""
    try:
        return dict(json.loads((state_dir / INFO_FILE).read_text()))
    except (OSError, ValueError):
        return None
