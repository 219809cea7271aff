"""One site's network side: identity, the DHT, the gRPC server, membership, rounds, state.

A :class:`Site` is what ``locod.found(...)`` and ``locod.join(...)`` return, and what
``locod start`` runs its built-in trainer on. Its life:

1. :meth:`Site.start` — lock the state dir, resolve ``--join HOST:PORT`` (in a
   subprocess: no gRPC object may exist before the DHT process forks), start the DHT,
   then the network thread and the gRPC server. Status and health answer from here on;
   the peer service refuses rounds and state (UNAVAILABLE) until a model is attached.
   The peer's record is published, not ready, so others see it starting.
2. :meth:`Site.run_config_of_run` — a joiner reads the run config the run publishes.
3. :meth:`Site.streaming_diloco` (:mod:`locod.daemon.outer_loop`) — a model's outer
   state is attached (:meth:`Site.attach`): reducer, group registry, state server and
   averager come up, the run config is published, and joiners take the run's state.
4. :meth:`Site.stop` — abandon rounds in flight, close the groups this peer leads, tell
   the others it leaves, mark its record left, stop the server, the network thread and
   the DHT (in about a second).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from locod.daemon.allreduce import Reducer
from locod.daemon.averager import GrpcAverager
from locod.daemon.config import PROTOCOL_VERSION, RunConfig, SiteConfig, parse_host_port
from locod.daemon.context import PeerContext
from locod.daemon.discovery import Discovery, load_or_create_key, start_dht
from locod.daemon.faults import FaultPlan
from locod.daemon.info import write_info
from locod.daemon.matchmaking import GroupRegistry, Matchmaker
from locod.daemon.membership import Membership
from locod.daemon.network import NetworkThread, start_server
from locod.daemon.resolve import ResolveError, resolve_joins
from locod.daemon.service import PeerService, RoundSide
from locod.daemon.state_sync import StateSync, config_json
from locod.daemon.state_transfer import StateServer
from locod.daemon.status import StatusBoard, StatusService
from locod.peer.streaming import StreamingDiLoCo

if TYPE_CHECKING:
    from torch import nn

    from locod.daemon.outer_loop import OuterLoop


class StartError(Exception):
    """The site cannot start; the message says why and what to do."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("locod")
    except PackageNotFoundError:
        return "0+unknown"


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """One site per state dir: a second one gets a clear error, not a corrupt checkpoint."""
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
            "give this site its own state dir"
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


class Site:
    """The network side of one peer of a run (see the module docstring for its life)."""

    def __init__(
        self,
        cfg: SiteConfig,
        *,
        log: logging.Logger | None = None,
        board: StatusBoard | None = None,
        lock_state_dir: bool = True,
    ) -> None:
        self.cfg = cfg
        self.log = log or logging.getLogger("locod")
        self.board = board or StatusBoard()
        self.network = NetworkThread()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="locod-codec")
        self.redraw: Callable[[], None] = lambda: None
        """Called while the site works on something long (a download), to redraw a view."""
        self.dht: Any = None
        self.discovery: Discovery | None = None
        self.server: Any = None
        self.ctx: PeerContext | None = None
        self.service: PeerService | None = None
        self.membership: Membership | None = None
        self.registry: GroupRegistry | None = None
        self.averager: GrpcAverager | None = None
        self.state_sync: StateSync | None = None
        self.worker: StreamingDiLoCo | None = None
        self.run: RunConfig | None = None
        self.listen_address = ""
        self.dht_addrs: list[str] = []
        self._lock_state_dir = lock_state_dir
        self._exit = contextlib.ExitStack()
        self._refresh_task: concurrent.futures.Future[None] | None = None
        self._log_handler: logging.Handler | None = None

    # -- the context manager of the library API -------------------------------------------

    def __enter__(self) -> Site:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def peer_id(self) -> str:
        if self.ctx is None:
            raise RuntimeError("the site is not started")
        return self.ctx.peer_id

    @property
    def faults(self) -> FaultPlan:
        """The faults injected into this site (tests): parsed from the config."""
        return self.ctx.faults if self.ctx is not None else FaultPlan.parse(self.cfg.faults)

    @property
    def joining(self) -> bool:
        """True when this site joins an existing run (it was given peers to join)."""
        return bool(self.cfg.join)

    def require(self) -> tuple[PeerContext, Membership]:
        if self.ctx is None or self.membership is None:
            raise RuntimeError("the site is not started: call start() or use it in a with")
        return self.ctx, self.membership

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """DHT first, then the network thread and the gRPC server (see the module doc)."""
        cfg = self.cfg
        try:
            if self._lock_state_dir:
                self._exit.enter_context(state_dir_lock(cfg.state_dir))
            else:
                cfg.state_dir.mkdir(parents=True, exist_ok=True)
            self._attach_log_file()
            self._start_dht()
            self._start_network()
        except BaseException:
            self.stop()
            raise

    def _attach_log_file(self) -> None:
        """The site logs to its state dir, whoever else listens to the ``locod`` logger."""
        path = self.cfg.state_dir / "locod.log"
        if any(
            isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
            for h in self.log.handlers
        ):
            return
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(handler)
        if self.log.level == logging.NOTSET or self.log.level > logging.INFO:
            self.log.setLevel(self.cfg.log_level.upper())
        self._log_handler = handler

    def _start_dht(self) -> None:
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
        self.dht_addrs = [str(a) for a in self.dht.get_visible_maddrs()]

    def _start_network(self) -> None:
        cfg, discovery = self.cfg, self.discovery
        assert discovery is not None
        self.network.start()
        self.ctx = ctx = PeerContext(
            cfg=cfg,
            peer_id=discovery.peer_id,
            address="",
            config_hash="",
            version=package_version(),
            log=self.log,
            executor=self.executor,
            faults=FaultPlan.parse(cfg.faults),
            dht_addrs=self.dht_addrs,
            client_only=cfg.client_only,
        )
        self.service = PeerService(ctx)
        status = StatusService(self.board, ctx)
        try:
            self.server, port = self.network.call(start_server(cfg, self.service, status), 30)
        except (OSError, RuntimeError) as error:
            raise StartError(f"cannot serve gRPC on {cfg.listen}: {error}") from error
        host, _ = parse_host_port(cfg.listen, "listen")
        if cfg.announce:
            ctx.address = cfg.announce
        elif not cfg.client_only:
            ctx.address = f"{outward_host() if host in ('0.0.0.0', '::', '') else host}:{port}"
        self.listen_address = f"{host}:{port}"
        self.membership = Membership(ctx, discovery, self.network, self.board, self.log)
        self.board.update(dht_addrs=self.dht_addrs, join_command=self.join_command())
        write_info(
            self.cfg.state_dir,
            {
                "pid": os.getpid(),
                "peer_id": ctx.peer_id,
                "run": cfg.run_name,
                "listen": self.listen_address,
                "address": ctx.address,
                "dht_addrs": self.dht_addrs,
                "protocol": PROTOCOL_VERSION,
            },
        )
        self.membership.publish()
        self._refresh_task = self.network.submit(self.membership.refresh_loop())
        self.board.update(state="started")

    def join_command(self) -> str:
        """What another site runs to join this run."""
        usable = [a for a in self.dht_addrs if "/127.0.0.1/" not in a] or self.dht_addrs
        parts = ["locod start", f"--run {self.cfg.run_name}"]
        parts += [f"--join {a}" for a in usable[:1]]
        if self.cfg.key:
            parts.append("--key <the run key>")
        return " ".join(parts)

    # -- the run config -------------------------------------------------------------------

    def run_config_of_run(self, wait_s: float | None = None) -> dict[str, Any] | None:
        """The run config the run publishes in the DHT, waiting for it up to ``wait_s``
        (default: 4 connect timeouts); None if nobody publishes one."""
        assert self.discovery is not None
        wait = 4 * self.cfg.connect_timeout_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait
        while True:
            found = self.discovery.run_config()
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(0.5)

    # -- attaching a model ----------------------------------------------------------------

    def streaming_diloco(self, model: nn.Module, **options: Any) -> OuterLoop:
        """Streaming DiLoCo around ``model`` on this site (see :func:`outer_loop.attach`)."""
        from locod.daemon.outer_loop import attach

        return attach(self, model, **options)

    def attach(self, worker: StreamingDiLoCo, run: RunConfig, step: Callable[[], int]) -> None:
        """Serve rounds and state for ``worker``'s outer state, under run config ``run``."""
        ctx, membership = self.require()
        if self.worker is not None:
            raise RuntimeError("a site trains one model: this one already has a model attached")
        assert self.service is not None and self.discovery is not None
        self.worker, self.run = worker, run
        ctx.config_hash = run.hash
        wire = worker.cfg.wire
        reducer = Reducer(ctx, [f.numel for f in worker.fragments], wire, worker.cfg.clip_factor)
        self.registry = GroupRegistry(ctx, reducer.register_soon)
        self.state_sync = StateSync(
            ctx,
            worker,
            membership,
            self.network,
            self.board,
            self.log,
            config_json=config_json(run.as_dict()),
            step=step,
            redraw=self._redraw,
        )
        state_server = StateServer(ctx, self.state_sync.snapshot, lambda: worker.version)
        self.service.attach(RoundSide(self.registry, reducer, state_server, worker.num_fragments))
        self.averager = GrpcAverager(
            ctx,
            self.network.loop,
            Matchmaker(ctx, self.registry),
            reducer,
            wire,
            repair=self.state_sync.repair,
        )
        worker.averager = self.averager
        self.discovery.publish_config(run.as_dict())
        membership.publish()

    def _redraw(self) -> None:
        self.redraw()  # looked up at each call: the owner may set it after attaching

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Leave the run and release everything; safe to call more than once."""
        began = time.monotonic()
        self.board.update(state="stopping")
        if self.averager is not None:
            self.averager.abandon_all()
        if self.ctx is not None and self.network.loop.is_running():
            with contextlib.suppress(Exception):
                self.network.call(self._leave(), timeout_s=3)
        if self.membership is not None:
            with contextlib.suppress(Exception):
                self.membership.publish(left=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.network.call(self.server.stop(grace=1.0), timeout_s=3)
            self.server = None
        self.network.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.dht is not None:
            with contextlib.suppress(Exception):
                self.dht.shutdown()
            self.dht = None
        if self.ctx is not None:
            self.log.info("site stopped in %.1fs", time.monotonic() - began)
        self.ctx = None
        if self._log_handler is not None:
            self.log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        self._exit.close()

    async def _leave(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        if self.registry is not None:
            self.registry.close_all()
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self.membership is not None:
            await self.membership.leave()
        await ctx.close_channels()
