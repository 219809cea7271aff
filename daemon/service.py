"""The ``locod.v1.Peer`` gRPC service: the server side of every peer-to-peer call."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from grpc import aio

from locod.daemon.allreduce import Reducer
from locod.daemon.context import PeerContext
from locod.daemon.matchmaking import GroupRegistry
from locod.daemon.rpc import peer_pb2 as pb
from locod.daemon.rpc import peer_pb2_grpc
from locod.daemon.state_transfer import StateServer


@dataclass(frozen=True, slots=True)
class RoundSide:
    """What serves rounds and state: it exists once a model is attached to the site."""

    registry: GroupRegistry
    reducer: Reducer
    state: StateServer
    fragment_count: int


class PeerService(peer_pb2_grpc.PeerServicer):
    """Checks every request against the run before handing it to the part that owns it.

    The server starts before a model is attached (so that status, health and ``Ping``
    answer while a site starts); until :meth:`attach`, calls about rounds and state are
    refused with UNAVAILABLE.
    """

    def __init__(self, ctx: PeerContext) -> None:
        self.ctx = ctx
        self._side: RoundSide | None = None

    def attach(self, side: RoundSide) -> None:
        self._side = side

    async def _attached(self, context: aio.ServicerContext) -> RoundSide:
        if self._side is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "this peer is starting: it has no model yet"
            )
            raise AssertionError("unreachable")
        return self._side

    async def _check_run(self, run: str, context: aio.ServicerContext) -> None:
        if run != self.ctx.cfg.run_name:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this peer is in run {self.ctx.cfg.run_name!r}, not {run!r}",
            )

    async def Ping(self, request: pb.PingRequest, context: aio.ServicerContext) -> pb.PingReply:
        return pb.PingReply(
            peer_id=self.ctx.peer_id,
            run=self.ctx.cfg.run_name,
            version=self.ctx.version,
            protocol=self.ctx.protocol,
            step=self.ctx.step,
            config_hash=self.ctx.config_hash,
            dht_addrs=self.ctx.dht_addrs,
        )

    async def JoinGroup(
        self, request: pb.JoinRequest, context: aio.ServicerContext
    ) -> pb.GroupReply:
        await self._check_run(request.run, context)
        side = await self._attached(context)
        refusal = ""
        if request.protocol != self.ctx.protocol:
            refusal = f"protocol {request.protocol} is not this peer's {self.ctx.protocol}"
        elif request.config_hash != self.ctx.config_hash:
            refusal = (
                f"run config {request.config_hash} differs from the run's "
                f"{self.ctx.config_hash}; restart without the differing flags"
            )
        elif not 0 <= request.fragment < side.fragment_count or request.round < 0:
            refusal = f"no fragment {request.fragment} / round {request.round} in this run"
        elif not request.member.peer_id:
            refusal = "the request names no member"
        if refusal:
            return pb.GroupReply(status=pb.GroupReply.REFUSED, message=refusal)
        return await side.registry.join(request.fragment, request.round, request.member)

    async def Reduce(
        self, request_iterator: AsyncIterator[pb.ReduceMessage], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ReduceMessage]:
        side = await self._attached(context)
        if self.ctx.client_only:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "client-only peer")
        async for message in side.reducer.serve(request_iterator, context):
            yield message

    async def GetStateManifest(
        self, request: pb.StateManifestRequest, context: aio.ServicerContext
    ) -> pb.StateManifest:
        await self._check_run(request.run, context)
        side = await self._attached(context)
        if any(not 0 <= p < side.fragment_count for p in request.fragments):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown fragment")
        return await side.state.manifest(request)

    async def GetStateChunk(
        self, request: pb.StateChunkRequest, context: aio.ServicerContext
    ) -> pb.StateChunk:
        await self._check_run(request.run, context)
        side = await self._attached(context)
        return await side.state.chunk(request, context)

    async def Leave(self, request: pb.LeaveNotice, context: aio.ServicerContext) -> pb.Ack:
        await self._check_run(request.run, context)
        if request.peer_id and request.peer_id != self.ctx.peer_id:
            # Remember which incarnation left (its joined_at, in its own clock): the same
            # peer restarted publishes a newer record and is in again.
            record = self.ctx.peers.pop(request.peer_id, None)
            self.ctx.left[request.peer_id] = record.joined_at if record else time.time()
            self.ctx.log.info("peer %s left the run", request.peer_id)
        return pb.Ack()

    async def DialBack(
        self, request: pb.DialBackRequest, context: aio.ServicerContext
    ) -> pb.DialBackReply:
        await self._check_run(request.run, context)
        stub = peer_pb2_grpc.PeerStub(self.ctx.channel(request.address))
        try:
            reply = await stub.Ping(
                pb.PingRequest(run=request.run, sender=self.ctx.peer_id),
                timeout=self.ctx.cfg.connect_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return pb.DialBackReply(
                reachable=False, message=f"{request.address}: {error.code().name}"
            )
        return pb.DialBackReply(reachable=reply.run == request.run, message="ok")
