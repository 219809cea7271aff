"""Group agreement for one round: every member ends with the same ordered member list.

The leader of a round is the oldest live peer that accepts connections (ordered by
(joined_at, peer_id) from the DHT records): new peers never take over leadership, so
peers that do not yet see a newcomer still pick the same leader. Members send
``JoinGroup(p, r)`` to the leader; the leader keeps the group open until every live peer
it knows has joined or ``matchmaking_window_s`` has passed, then answers every member with
the same :class:`Group`. A member the leader had not heard of yet (a newcomer whose DHT
record has not reached it) is expected from the next round on. A leader that cannot be
reached is left out and the next oldest is asked, so a dead leader costs one connect
timeout.

A peer that comes after its round's group closed gets ``TOO_LATE`` with the group, and
fetches the result as a receive-only member (so it still applies the same round: I1).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from locod.daemon.context import PeerContext
from locod.daemon.discovery import PeerRecord
from locod.daemon.rpc import peer_pb2 as pb
from locod.daemon.rpc import peer_pb2_grpc

CLOSED_TTL_S = 600.0


class RoundFailed(Exception):
    """This round produced nothing for this peer; the message says why."""


@dataclass(frozen=True, slots=True)
class Group:
    """An agreed group: same members in the same order on every member."""

    group_id: str
    fragment: int
    round: int
    members: tuple[pb.Member, ...]
    majority_hash: str
    run_step: int = 0
    open_for_s: float = 0.0
    closed_at: float = 0.0
    """Leader-local monotonic time of the close (not sent: clocks differ between peers)."""
    behind_s: float = 0.0
    """For a latecomer: how long after the first member it came."""

    @property
    def reducers(self) -> tuple[pb.Member, ...]:
        """Members that reduce a part each (client-only members reduce nothing)."""
        return tuple(m for m in self.members if not m.client_only)

    def member_ids(self) -> list[str]:
        return [m.peer_id for m in self.members]

    def reply(self, status: int, message: str = "") -> pb.GroupReply:
        return pb.GroupReply(
            status=status,  # type: ignore[arg-type]
            group_id=self.group_id,
            members=list(self.members),
            majority_hash=self.majority_hash,
            message=message,
            run_step=self.run_step,
            open_for_s=self.open_for_s,
            closed_ago_s=max(0.0, time.monotonic() - self.closed_at),
        )

    @classmethod
    def from_reply(cls, reply: pb.GroupReply, fragment: int, round_index: int) -> Group:
        ids = [m.peer_id for m in reply.members]
        if not ids or len(set(ids)) != len(ids) or ids != sorted(ids):
            raise RoundFailed("the leader sent a malformed member list")
        return cls(
            group_id=reply.group_id,
            fragment=fragment,
            round=round_index,
            members=tuple(reply.members),
            majority_hash=reply.majority_hash,
            run_step=reply.run_step,
            open_for_s=reply.open_for_s,
            behind_s=reply.open_for_s + reply.closed_ago_s,
        )


def make_group(
    fragment: int,
    round_index: int,
    members: dict[str, pb.Member],
    leader: str,
    run_step: int,
    open_for_s: float = 0.0,
) -> Group:
    ordered = tuple(members[k] for k in sorted(members))
    hashes = Counter(m.global_hash for m in ordered)
    top = max(hashes.values())
    majority = min(h for h, count in hashes.items() if count == top)
    digest = hashlib.blake2b(digest_size=8)
    for part in (str(fragment), str(round_index), leader, f"{time.time():.6f}", *sorted(members)):
        digest.update(part.encode() + b"\0")
    return Group(
        group_id=digest.hexdigest(),
        fragment=fragment,
        round=round_index,
        members=ordered,
        majority_hash=majority,
        run_step=run_step,
        open_for_s=open_for_s,
        closed_at=time.monotonic(),
    )


def _record_of(member: pb.Member, config_hash: str) -> PeerRecord:
    """What a JoinGroup tells the leader about a member, as a provisional peer record."""
    return PeerRecord(
        peer_id=member.peer_id,
        address=member.address,
        client_only=member.client_only,
        version="",
        config_hash=config_hash,
        step=member.step,
        tokens_per_s=0.0,
        joined_at=member.joined_at or time.time(),
        ready=True,
        updated_at=time.time(),
    )


@dataclass(slots=True)
class _Pending:
    members: dict[str, pb.Member] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    opened_at: float = field(default_factory=time.monotonic)
    timer: asyncio.Task[None] | None = None


class GroupRegistry:
    """The leader's side: open groups, close them, remember them for latecomers."""

    def __init__(self, ctx: PeerContext, on_close: Callable[[Group], None]) -> None:
        self.ctx = ctx
        self.on_close = on_close
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._closed: dict[tuple[int, int], tuple[Group, float]] = {}

    async def join(self, fragment: int, round_index: int, member: pb.Member) -> pb.GroupReply:
        key = (fragment, round_index)
        self._prune()
        # Late or not, the member is live: expect it from the next round on.
        self.ctx.hear(_record_of(member, self.ctx.config_hash))
        if key in self._closed:
            return self._answer(key, member)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
            pending.timer = asyncio.get_running_loop().create_task(self._close_later(key))
        pending.members[member.peer_id] = member
        if self._complete(pending):
            self._close(key)
        await pending.closed.wait()
        return self._answer(key, member)

    def _answer(self, key: tuple[int, int], member: pb.Member) -> pb.GroupReply:
        group, _ = self._closed[key]
        if member.peer_id in group.member_ids():
            return group.reply(pb.GroupReply.OK)
        return group.reply(
            pb.GroupReply.TOO_LATE,
            "the group of this round closed before you joined; fetch the result receive-only",
        )

    def _complete(self, pending: _Pending) -> bool:
        expected = {r.peer_id for r in self.ctx.ready_peers()}
        return expected <= set(pending.members)

    async def _close_later(self, key: tuple[int, int]) -> None:
        await asyncio.sleep(self.ctx.cfg.matchmaking_window_s)
        if key in self._pending:
            self._close(key)

    def _close(self, key: tuple[int, int]) -> None:
        pending = self._pending.pop(key)
        if pending.timer is not None and pending.timer is not asyncio.current_task():
            pending.timer.cancel()
        group = make_group(
            key[0],
            key[1],
            pending.members,
            self.ctx.peer_id,
            self.ctx.step,
            time.monotonic() - pending.opened_at,
        )
        self._closed[key] = (group, time.monotonic())
        self.ctx.log.debug(
            "round (%d, %d): closed group %s with %s",
            key[0],
            key[1],
            group.group_id,
            ", ".join(group.member_ids()),
        )
        self.on_close(group)
        pending.closed.set()

    def _prune(self) -> None:
        cutoff = time.monotonic() - CLOSED_TTL_S
        for key in [k for k, (_, at) in self._closed.items() if at < cutoff]:
            del self._closed[key]

    def close_all(self) -> None:
        """Shutting down: close every open group now so nobody waits on us."""
        for key in list(self._pending):
            self._close(key)


class Matchmaker:
    """The member's side: find the leader, join, get the agreed group."""

    def __init__(self, ctx: PeerContext, registry: GroupRegistry) -> None:
        self.ctx = ctx
        self.registry = registry

    async def form_group(
        self, fragment: int, round_index: int, me: pb.Member
    ) -> tuple[Group, bool]:
        """(group, late): late means the group closed without us (receive-only)."""
        cfg = self.ctx.cfg
        deadline = time.monotonic() + cfg.matchmaking_window_s + 3 * cfg.connect_timeout_s
        tried: set[str] = set()
        request = pb.JoinRequest(
            run=cfg.run_name,
            fragment=fragment,
            round=round_index,
            member=me,
            protocol=self.ctx.protocol,
            config_hash=self.ctx.config_hash,
        )
        while time.monotonic() < deadline:
            leader = next(
                (
                    r
                    for r in self.ctx.ready_peers()
                    if not r.client_only and r.peer_id not in tried and r.address
                ),
                None,
            )
            if leader is None:
                raise RoundFailed("no reachable leader for this round")
            self.ctx.log.debug(
                "round (%d, %d): joining leader %s", fragment, round_index, leader.peer_id
            )
            if leader.peer_id == self.ctx.peer_id:
                reply = await self.registry.join(fragment, round_index, me)
            else:
                stub = peer_pb2_grpc.PeerStub(self.ctx.channel(leader.address))
                try:
                    reply = await stub.JoinGroup(
                        request, timeout=cfg.matchmaking_window_s + cfg.connect_timeout_s
                    )
                except grpc.aio.AioRpcError as error:
                    self.ctx.suspect(leader.peer_id, f"JoinGroup: {error.code().name}")
                    tried.add(leader.peer_id)
                    continue
            if reply.status == pb.GroupReply.OK:
                return Group.from_reply(reply, fragment, round_index), False
            if reply.status == pb.GroupReply.TOO_LATE and reply.members:
                return Group.from_reply(reply, fragment, round_index), True
            raise RoundFailed(f"leader {leader.peer_id} refused: {reply.message}")
        raise RoundFailed("matchmaking timed out")
