"""Proof of a private run's key on every RPC: an HMAC over method, sender and time.

The client adds ``x-locod-auth: <sender>:<unix time>:<hex hmac>`` to every call; the
server's interceptor recomputes it and refuses (UNAUTHENTICATED) calls without it, with a
wrong key, or with a time more than ``MAX_SKEW_S`` away (so a captured header cannot be
replayed for long). The key itself never travels. Health checks and reflection stay open:
they reveal nothing about the run.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

HEADER = "x-locod-auth"
MAX_SKEW_S = 120.0
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def sign(key: str, method: str, sender: str, at: float) -> str:
    """The header value proving ``key`` for one call."""
    stamp = f"{at:.3f}"
    digest = hmac.new(key.encode(), f"{method}\n{sender}\n{stamp}".encode(), hashlib.sha256)
    return f"{sender}:{stamp}:{digest.hexdigest()}"


def verify(key: str, method: str, value: str, *, now: float | None = None) -> str | None:
    """None if ``value`` proves ``key`` for ``method``, else the reason it does not."""
    try:
        sender, stamp, digest = value.rsplit(":", 2)
        at = float(stamp)
    except ValueError:
        return "malformed auth header"
    now = time.time() if now is None else now
    if abs(now - at) > MAX_SKEW_S:
        return f"auth header is {now - at:+.0f}s off this peer's clock"
    expected = sign(key, method, sender, at).rsplit(":", 1)[1]
    if not hmac.compare_digest(expected, digest):
        return "wrong run key"
    return None


class ServerAuth(aio.ServerInterceptor):
    """Refuses calls that do not prove the run key."""

    def __init__(self, key: str) -> None:
        self.key = key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        value = metadata.get(HEADER)
        reason = (
            "this run is private: the call carries no proof of the run key"
            if not value
            else verify(self.key, method, str(value))
        )
        if reason is None:
            return await continuation(handler_call_details)
        return _refusal(reason)


def _refusal(reason: str) -> grpc.RpcMethodHandler:
    async def refuse(_request: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    async def refuse_stream(_requests: Any, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    # Which handler kind applies is unknown here; a stream-stream handler accepts any call.
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


class _ClientAuth(
    aio.UnaryUnaryClientInterceptor,
    aio.UnaryStreamClientInterceptor,
    aio.StreamUnaryClientInterceptor,
    aio.StreamStreamClientInterceptor,
):
    def __init__(self, key: str, sender: str) -> None:
        self.key = key
        self.sender = sender

    def _details(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = aio.Metadata(*(details.metadata or ()))
        metadata.add(HEADER, sign(self.key, method, self.sender, time.time()))
        return aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


def client_interceptors(key: str, sender: str) -> list[aio.ClientInterceptor]:
    """Interceptors that sign every outgoing call (none for a public run)."""
    return [_ClientAuth(key, sender)] if key else []
