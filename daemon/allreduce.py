"""One round's butterfly all-reduce over gRPC bidirectional streams.

The fragment's flat outer gradient is cut into one part per reducer (the group's members
that accept connections), on quantization-block boundaries so a part encodes exactly as the
same values would in the whole tensor. Every member streams part j to reducer j
(``Reduce``: header, chunks, end); the reducer decodes the contributions, averages them in
fp32 in member order, encodes the mean once, and streams those bytes back to every member,
so every member decodes identical bytes (I1). Client-only members send and receive over
the streams they open and reduce nothing.

Deadlines: each read of a stream waits at most ``chunk_timeout_s``; a reducer collects
until half the round timeout and then reduces whatever arrived (a member that stalled or
sent garbage is dropped from that part, and still gets the mean); a member gives up on the
whole round after ``round_timeout_s``.

A reducer that dies mid-round takes its part with it; every member notices at once (its
stream breaks) and sends that part to the part's fallback, the next reducer in group
order, which reduces it among the members left. So a round survives the death of any
single member (I5).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import torch
from grpc import aio

from locod.daemon.context import CHUNK_BYTES, PeerContext
from locod.daemon.matchmaking import Group, RoundFailed
from locod.daemon.rpc import peer_pb2 as pb
from locod.daemon.rpc import peer_pb2_grpc
from locod.peer.codec import CodecError, WireFormat, decode, encode
from locod.peer.outer import bounded_mean

RESULT_TTL_S = 600.0
_PAYLOAD_SLACK = 4096


def part_bounds(numel: int, parts: int, align: int) -> list[tuple[int, int]]:
    """Split [0, numel) into ``parts`` ranges cut on multiples of ``align``."""
    if parts < 1:
        raise ValueError("a group needs at least one reducer")
    blocks = math.ceil(numel / align)
    return [
        (min(blocks * j // parts * align, numel), min(blocks * (j + 1) // parts * align, numel))
        for j in range(parts)
    ]


def max_payload_bytes(numel: int) -> int:
    """No honest encoding of ``numel`` values is larger than fp32 plus framing."""
    return 4 * numel + 8 * (numel // 2 + 1) + _PAYLOAD_SLACK


def chunks(payload: bytes) -> list[bytes]:
    return [payload[i : i + CHUNK_BYTES] for i in range(0, len(payload), CHUNK_BYTES)] or [b""]


@dataclass(slots=True)
class _Result:
    payload: bytes
    contributors: int


@dataclass(slots=True)
class ReduceSession:
    """Reducer j's collection of part j for one group."""

    group: Group
    part: int
    numel: int
    collect_until: float
    fallback_for: str = ""
    """The failed reducer whose part this session takes over ('' for the primary)."""
    contributions: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future[_Result] | None = None
    finished_at: float = 0.0

    def expect(self) -> set[str]:
        return set(self.group.member_ids()) - {self.fallback_for}

    def add(self, sender: str, payload: bytes, weight: float) -> None:
        if sender in self.contributions or sender in self.dropped:
            return
        self.contributions[sender] = (payload, weight)
        self._check()

    def drop(self, sender: str, reason: str) -> None:
        if sender not in self.contributions and sender not in self.dropped:
            self.dropped[sender] = reason
            self._check()

    def _check(self) -> None:
        if self.expect() <= set(self.contributions) | set(self.dropped):
            self.all_in.set()


class Reducer:
    """This peer's reducer duties: a session per (group, part) it reduces."""

    def __init__(
        self,
        ctx: PeerContext,
        fragment_numels: list[int],
        wire: WireFormat,
        clip_factor: float = 0.0,
    ) -> None:
        self.ctx = ctx
        self.fragment_numels = fragment_numels
        self.wire = wire
        self.clip_factor = clip_factor
        self.groups: dict[str, Group] = {}
        self._registered = asyncio.Condition()
        self.sessions: dict[tuple[str, int, str], ReduceSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def register(self, group: Group) -> None:
        """Learn a group (at its close, or from the leader's reply)."""
        async with self._registered:
            self.groups.setdefault(group.group_id, group)
            self._registered.notify_all()
        self._prune()

    def register_soon(self, group: Group) -> None:
        task = asyncio.get_running_loop().create_task(self.register(group))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def group(self, group_id: str, wait_s: float) -> Group | None:
        async with self._registered:
            try:
                await asyncio.wait_for(
                    self._registered.wait_for(lambda: group_id in self.groups), wait_s
                )
            except TimeoutError:
                return None
        return self.groups[group_id]

    def session(self, group: Group, part: int, fallback_for: str = "") -> ReduceSession:
        key = (group.group_id, part, fallback_for)
        session = self.sessions.get(key)
        if session is None:
            numel = self.fragment_numels[group.fragment]
            start, end = part_bounds(numel, len(group.reducers), self.wire.block_size)[part]
            # A fallback only waits for members that noticed the same failure, at about
            # the same moment: a short collection keeps the round inside its deadline.
            collect_s = (
                2 * self.ctx.cfg.chunk_timeout_s if fallback_for else self.ctx.cfg.round_timeout_s
            ) / 2
            session = ReduceSession(
                group=group,
                part=part,
                numel=end - start,
                collect_until=time.monotonic() + collect_s,
                fallback_for=fallback_for,
            )
            session.result = asyncio.get_running_loop().create_future()
            self.sessions[key] = session
            task = asyncio.get_running_loop().create_task(self._run(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return session

    async def _run(self, session: ReduceSession) -> None:
        assert session.result is not None
        try:
            await asyncio.wait_for(
                session.all_in.wait(), max(0.0, session.collect_until - time.monotonic())
            )
        except TimeoutError:
            for sender in session.expect() - set(session.contributions) - set(session.dropped):
                session.dropped[sender] = "missed the collection deadline"
        for sender, reason in session.dropped.items():
            self.ctx.log.warning(
                "round (%d, %d) part %d: dropped %s: %s",
                session.group.fragment,
                session.group.round,
                session.part,
                sender,
                reason,
            )
        ordered = [
            (s, *session.contributions[s])
            for s in session.group.member_ids()
            if s in session.contributions
        ]
        loop = asyncio.get_running_loop()
        try:
            payload, count, rejected = await loop.run_in_executor(
                self.ctx.executor, _reduce, ordered, session.numel, self.wire, self.clip_factor
            )
        except RoundFailed as error:
            session.result.set_exception(error)
            session.result.exception()  # retrieved here: members see it through the stream
        else:
            for sender, reason in rejected:
                self.ctx.log.warning(
                    "round (%d, %d) part %d: rejected the contribution of %s: %s",
                    session.group.fragment,
                    session.group.round,
                    session.part,
                    sender,
                    reason,
                )
            session.result.set_result(_Result(payload, count))
        session.finished_at = time.monotonic()
        for sender in session.contributions:
            session.contributions[sender] = (b"", session.contributions[sender][1])

    def _prune(self) -> None:
        cutoff = time.monotonic() - RESULT_TTL_S
        for key in [
            k for k, s in self.sessions.items() if s.finished_at and s.finished_at < cutoff
        ]:
            del self.sessions[key]
        live = {k[0] for k in self.sessions}
        for group_id in [g for g in self.groups if g not in live and len(self.groups) > 1000]:
            del self.groups[group_id]

    async def serve(
        self, requests: AsyncIterator[pb.ReduceMessage], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ReduceMessage]:
        """Server side of ``Reduce``: take one member's part, answer with the mean."""
        cfg = self.ctx.cfg
        stream = requests.__aiter__()
        try:
            first = await asyncio.wait_for(anext(stream), cfg.chunk_timeout_s)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no header")
            return
        header = first.header
        if first.WhichOneof("body") != "header" or header.run != cfg.run_name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a header of this run")
        group = await self.group(header.group_id, cfg.connect_timeout_s)
        if group is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown group {header.group_id}")
            return
        reducers = [m.peer_id for m in group.reducers]
        responsible = (
            header.fallback_for in reducers and self.ctx.peer_id in reducers
            if header.fallback_for
            else 0 <= header.part < len(reducers) and reducers[header.part] == self.ctx.peer_id
        )
        if not 0 <= header.part < len(reducers) or not responsible:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this peer does not reduce part {header.part} of group {group.group_id}",
            )
        is_member = header.sender in group.member_ids()
        if header.payload_bytes > 0 and not is_member:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{header.sender} is not a member of group {group.group_id}",
            )
        session = self.session(group, header.part, header.fallback_for)
        if header.payload_bytes > 0:
            await self._collect(session, header, stream)
        elif is_member:
            # A member that only listens (it came late, or its θ_g differs from the group's).
            session.drop(header.sender, "receive-only")
        assert session.result is not None
        try:
            result = await asyncio.wait_for(asyncio.shield(session.result), cfg.round_timeout_s)
        except RoundFailed as error:
            yield pb.ReduceMessage(error=pb.ReduceError(message=str(error)))
            return
        except TimeoutError:
            yield pb.ReduceMessage(error=pb.ReduceError(message="reduce timed out"))
            return
        yield pb.ReduceMessage(
            header=pb.ReduceHeader(
                run=cfg.run_name,
                group_id=group.group_id,
                fragment=group.fragment,
                round=group.round,
                part=header.part,
                sender=self.ctx.peer_id,
                numel=session.numel,
                payload_bytes=len(result.payload),
                contributors=result.contributors,
            )
        )
        for chunk in chunks(result.payload):
            self.ctx.traffic.bytes_sent += len(chunk)
            yield pb.ReduceMessage(chunk=chunk)
        yield pb.ReduceMessage(end=pb.ReduceEnd())

    async def _collect(
        self,
        session: ReduceSession,
        header: pb.ReduceHeader,
        stream: AsyncIterator[pb.ReduceMessage],
    ) -> None:
        """Read one member's payload; drop the member on a stall or a protocol error."""
        cfg = self.ctx.cfg
        sender = header.sender
        if header.numel != session.numel:
            session.drop(sender, f"sent {header.numel} values, part has {session.numel}")
            return
        if header.payload_bytes > max_payload_bytes(session.numel):
            session.drop(sender, f"announced {header.payload_bytes} bytes, too many")
            return
        if not (math.isfinite(header.weight) and header.weight > 0):
            session.drop(sender, f"weight {header.weight} is not a positive number")
            return
        buffer = bytearray()
        try:
            while len(buffer) < header.payload_bytes:
                message = await asyncio.wait_for(anext(stream), cfg.chunk_timeout_s)
                if message.WhichOneof("body") != "chunk":
                    session.drop(sender, "stream ended before the payload")
                    return
                buffer.extend(message.chunk)
                self.ctx.traffic.bytes_received += len(message.chunk)
                if len(buffer) > header.payload_bytes:
                    session.drop(sender, "sent more bytes than announced")
                    return
            end = await asyncio.wait_for(anext(stream), cfg.chunk_timeout_s)
            if end.WhichOneof("body") != "end":
                session.drop(sender, "no end marker after the payload")
                return
        except TimeoutError:
            session.drop(sender, f"stalled for {cfg.chunk_timeout_s:.0f}s mid-stream")
            return
        except StopAsyncIteration:
            session.drop(sender, "closed the stream mid-payload")
            return
        except asyncio.CancelledError:
            session.drop(sender, "lost the connection mid-payload")
            raise
        session.add(sender, bytes(buffer), header.weight)


def _reduce(
    ordered: list[tuple[str, bytes, float]], numel: int, wire: WireFormat, clip_factor: float
) -> tuple[bytes, int, list[tuple[str, str]]]:
    """Decode, average in member order in fp32 (norms bounded), encode once.

    Runs in the executor. Returns the encoded mean, how many contributions it holds, and
    (sender, reason) for every contribution rejected.
    """
    decoded = []
    rejected = []
    for sender, payload, weight in ordered:
        try:
            decoded.append(
                (decode(payload, expected_numel=numel, expected_codec=wire.codec), weight)
            )
        except CodecError as error:
            rejected.append((sender, str(error)))
    if not decoded:
        raise RoundFailed("no valid contribution reached the reducer")
    mean, scaled = bounded_mean(decoded, clip_factor)
    if scaled:
        rejected.append(
            (
                "(norm bound)",
                f"{scaled} contribution(s) scaled down to {clip_factor}× the median norm",
            )
        )
    return encode(mean, wire), len(decoded), rejected


async def allreduce(
    ctx: PeerContext,
    reducer: Reducer,
    group: Group,
    delta: torch.Tensor | None,
    weight: float,
    wire: WireFormat,
) -> tuple[torch.Tensor, int]:
    """This member's side of the round: send every part, gather every mean.

    ``delta`` None means receive-only (a member that came too late, or must not
    contribute). Returns Δ̄ (fp32) and the smallest number of contributors of any part.
    """
    numel = reducer.fragment_numels[group.fragment]
    bounds = part_bounds(numel, len(group.reducers), wire.block_size)
    loop = asyncio.get_running_loop()
    payloads: list[bytes | None] = [None] * len(bounds)
    if delta is not None:
        if delta.numel() != numel:
            raise RoundFailed(f"outer gradient has {delta.numel()} values, fragment {numel}")
        encoded = await asyncio.gather(
            *(
                loop.run_in_executor(ctx.executor, encode, delta[a:b].contiguous(), wire)
                for a, b in bounds
            )
        )
        payloads = list(encoded)
    deadline = time.monotonic() + ctx.cfg.round_timeout_s
    tasks = [
        asyncio.ensure_future(
            _one_part(ctx, reducer, group, j, reducer_member, payloads[j], weight, b - a, deadline)
        )
        for j, (reducer_member, (a, b)) in enumerate(zip(group.reducers, bounds, strict=True))
    ]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*tasks), max(0.1, deadline - time.monotonic()) + 1.0
        )
    except TimeoutError:
        raise RoundFailed(f"the round took longer than {ctx.cfg.round_timeout_s:.0f}s") from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    parts = await asyncio.gather(
        *(
            loop.run_in_executor(ctx.executor, _decode_part, payload, b - a, wire.codec)
            for (payload, _), (a, b) in zip(results, bounds, strict=True)
        )
    )
    return torch.cat(parts) if parts else torch.zeros(0), min(c for _, c in results)


def _decode_part(payload: bytes, numel: int, codec: str) -> torch.Tensor:
    try:
        return decode(payload, expected_numel=numel, expected_codec=codec)
    except CodecError as error:
        raise RoundFailed(f"the mean of a part did not decode: {error}") from error


async def _one_part(
    ctx: PeerContext,
    reducer: Reducer,
    group: Group,
    part: int,
    reducer_member: pb.Member,
    payload: bytes | None,
    weight: float,
    numel: int,
    deadline: float,
) -> tuple[bytes, int]:
    """Exchange one part with its reducer; if that reducer fails, with its fallbacks
    (the next reducers in group order, so every member picks the same one)."""
    ids = [m.peer_id for m in group.reducers]
    start = ids.index(reducer_member.peer_id)
    candidates = group.reducers[start:] + group.reducers[:start]
    failure: _ReducerLost | None = None
    for candidate in candidates:
        if failure is not None:
            if time.monotonic() >= deadline:
                break
            ctx.log.info(
                "round (%d, %d): reducer %s of part %d failed (%s); sending the part to %s",
                group.fragment,
                group.round,
                reducer_member.peer_id,
                part,
                failure,
                candidate.peer_id,
            )
        try:
            return await _exchange(
                ctx,
                reducer,
                group,
                part,
                candidate,
                payload,
                weight,
                numel,
                deadline,
                fallback_for="" if candidate is reducer_member else reducer_member.peer_id,
            )
        except _ReducerLost as lost:
            failure = lost
    raise RoundFailed(f"part {part}: its reducer and every fallback failed ({failure})")


class _ReducerLost(RoundFailed):
    """The reducer could not be reached or broke off: the part may go to a fallback."""


async def _exchange(
    ctx: PeerContext,
    reducer: Reducer,
    group: Group,
    part: int,
    reducer_member: pb.Member,
    payload: bytes | None,
    weight: float,
    numel: int,
    deadline: float,
    fallback_for: str = "",
) -> tuple[bytes, int]:
    """Send one part to one reducer and read the mean (in-process when it is this peer)."""
    if reducer_member.peer_id == ctx.peer_id:
        session = reducer.session(group, part, fallback_for)
        if payload is not None:
            session.add(ctx.peer_id, payload, weight)
        else:
            session.drop(ctx.peer_id, "receive-only")
        assert session.result is not None
        try:
            result = await asyncio.wait_for(
                asyncio.shield(session.result), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise RoundFailed(f"part {part} was not reduced in time") from None
        return result.payload, result.contributors
    header = pb.ReduceHeader(
        run=ctx.cfg.run_name,
        group_id=group.group_id,
        fragment=group.fragment,
        round=group.round,
        part=part,
        sender=ctx.peer_id,
        weight=weight if payload else 0.0,
        numel=numel,
        payload_bytes=len(payload) if payload else 0,
        fallback_for=fallback_for,
    )
    stub = peer_pb2_grpc.PeerStub(ctx.channel(reducer_member.address))
    call = stub.Reduce(timeout=max(0.1, deadline - time.monotonic()))
    try:
        await call.write(pb.ReduceMessage(header=header))
        if payload:
            await _send_payload(ctx, call, group, payload)
        await call.done_writing()
        return await _read_mean(ctx, call, numel, deadline)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            ctx.suspect(reducer_member.peer_id, "Reduce: UNAVAILABLE")
        message = f"part {part} from {reducer_member.peer_id}: {error.code().name}"
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise RoundFailed(message) from None  # no time left for a fallback
        raise _ReducerLost(f"{message} {error.details()}") from None
    finally:
        call.cancel()


async def _send_payload(
    ctx: PeerContext, call: aio.StreamStreamCall, group: Group, payload: bytes
) -> None:
    faults = ctx.faults
    where = (group.fragment, group.round)
    corrupt = faults.active("corrupt-send", *where)
    for index, piece in enumerate(chunks(payload)):
        chunk = bytes(b ^ 0x5A for b in piece) if corrupt else piece
        await call.write(pb.ReduceMessage(chunk=chunk))
        ctx.traffic.bytes_sent += len(chunk)
        if index == 0 and faults.active("exit-in-round", *where):
            ctx.log.error("fault injected: exiting in round (%d, %d)", *where)
            os._exit(137)
        if index == 0 and faults.active("stall-send", *where):
            ctx.log.warning("fault injected: stalling in round (%d, %d)", *where)
            await asyncio.Event().wait()
    await call.write(pb.ReduceMessage(end=pb.ReduceEnd()))


async def _read_mean(
    ctx: PeerContext, call: aio.StreamStreamCall, numel: int, deadline: float
) -> tuple[bytes, int]:
    chunk_timeout = ctx.cfg.chunk_timeout_s
    try:
        first = await asyncio.wait_for(call.read(), max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        raise RoundFailed("the reducer did not answer before the round's deadline") from None
    kind = first.WhichOneof("body") if first is not aio.EOF else None
    if kind == "error":
        raise RoundFailed(f"reducer failed: {first.error.message}")
    if kind != "header" or first.header.numel != numel:
        raise _ReducerLost("reducer answered without a valid header")
    expected = first.header.payload_bytes
    if expected > max_payload_bytes(numel):
        raise _ReducerLost(f"reducer announced {expected} bytes, too many")
    buffer = bytearray()
    try:
        while len(buffer) < expected:
            message = await asyncio.wait_for(call.read(), chunk_timeout)
            if message is aio.EOF or message.WhichOneof("body") != "chunk":
                raise _ReducerLost("reducer's answer ended early")
            buffer.extend(message.chunk)
            ctx.traffic.bytes_received += len(message.chunk)
        end = await asyncio.wait_for(call.read(), chunk_timeout)
    except TimeoutError:
        raise _ReducerLost(f"reducer stalled for {chunk_timeout:.0f}s mid-answer") from None
    if end is aio.EOF or end.WhichOneof("body") != "end" or len(buffer) != expected:
        raise _ReducerLost("reducer's answer is malformed")
    return bytes(buffer), first.header.contributors
