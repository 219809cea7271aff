"""The network thread: one asyncio loop running the gRPC server, rounds and DHT refresh.

Training runs in the main thread; everything that talks to other peers runs here. CPU-heavy
encode/decode goes to a small thread pool, never the event loop, so one slow decode does
not stall every stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from locod.daemon.auth import ServerAuth
from locod.daemon.config import SiteConfig
from locod.daemon.context import MAX_MESSAGE_BYTES
from locod.daemon.rpc import peer_pb2, peer_pb2_grpc, status_pb2, status_pb2_grpc
from locod.daemon.service import PeerService
from locod.daemon.status import StatusService

T = TypeVar("T")

SERVICE_NAMES = (
    peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name,
    status_pb2.DESCRIPTOR.services_by_name["Status"].full_name,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)


class NetworkThread:
    """An event loop in a background thread, with a way to run coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self._thread = threading.Thread(target=self._run, name="locod-network", daemon=True)
        self._stopping = False

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Errors no task caught go to the log, not to stderr as a traceback.

        While the loop stops, gRPC's completion-queue poller can fire once more on a file
        descriptor its shutdown already closed (EBADF): harmless, and not worth a line.
        """
        error = context.get("exception")
        if self._stopping and isinstance(error, OSError) and error.errno == errno.EBADF:
            return
        logging.getLogger("locod").warning(
            "network loop: %s%s", context.get("message", "error"), f": {error!r}" if error else ""
        )

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return self.submit(coro).result(timeout=timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        if not self._thread.is_alive():
            return

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.call(cancel_rest(), timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)


async def start_server(
    cfg: SiteConfig, peer_service: PeerService, status_service: StatusService
) -> tuple[aio.Server, int]:
    """Serve the peer, status, health and reflection services; returns (server, port)."""
    interceptors = [ServerAuth(cfg.key)] if cfg.key else []
    server = aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    peer_pb2_grpc.add_PeerServicer_to_server(peer_service, server)
    status_pb2_grpc.add_StatusServicer_to_server(status_service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    if cfg.tls_cert is not None and cfg.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())]
        )
        port = server.add_secure_port(cfg.listen, credentials)
    else:
        port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise OSError(f"cannot listen on {cfg.listen} (address in use or not this machine's)")
    await server.start()
    for name in ("", *SERVICE_NAMES[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port
