"""The daemon's implementation of ``peer.averaging.Averager``: rounds over gRPC.

The training thread calls :meth:`GrpcAverager.start` and :meth:`GrpcAverager.result`; each
round runs as a task on the network thread's event loop (matchmaking, then the butterfly
all-reduce), so training goes on while it flies. ``result`` waits at most the time it is
given; whatever goes wrong in a round becomes a ``SyncFailed`` for that round only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable

from locod.daemon.allreduce import Reducer, allreduce
from locod.daemon.context import PeerContext
from locod.daemon.matchmaking import Matchmaker, RoundFailed
from locod.daemon.rpc import peer_pb2 as pb
from locod.peer.averaging import FragmentState, SyncFailed, SyncOutcome, SyncRequest, SyncResult
from locod.peer.codec import WireFormat

Repair = Callable[[int, int, str], Awaitable[tuple[FragmentState, bool] | None]]
"""(fragment, round, majority hash) → (state, post_round) from a peer holding the group's
state, or None if nobody could provide it."""


class GrpcAverager:
    """Bridges the training thread to the network thread's rounds."""

    def __init__(
        self,
        ctx: PeerContext,
        loop: asyncio.AbstractEventLoop,
        matchmaker: Matchmaker,
        reducer: Reducer,
        wire: WireFormat,
        repair: Repair | None = None,
    ) -> None:
        self.ctx = ctx
        self.loop = loop
        self.matchmaker = matchmaker
        self.reducer = reducer
        self.wire = wire
        self.repair = repair
        self._rounds: dict[tuple[int, int], concurrent.futures.Future[SyncOutcome]] = {}
        self.behind_s = 0.0
        """Set when this peer came after a group closed: how far behind the group it is.
        The training loop reads it and catches up (see ``Daemon._catch_up``)."""

    def start(self, request: SyncRequest) -> None:
        key = (request.fragment, request.round)
        old = self._rounds.pop(key, None)
        if old is not None:
            old.cancel()
        self._rounds[key] = asyncio.run_coroutine_threadsafe(self._round(request), self.loop)

    def result(self, fragment: int, round_index: int, timeout_s: float) -> SyncOutcome | None:
        future = self._rounds.get((fragment, round_index))
        if future is None:
            return SyncFailed(f"round ({fragment}, {round_index}) was never started")
        try:
            outcome = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            return None
        except concurrent.futures.CancelledError:
            outcome = SyncFailed("cancelled")
        except Exception as error:
            outcome = SyncFailed(f"{type(error).__name__}: {error}")
        self._rounds.pop((fragment, round_index), None)
        return outcome

    def abandon(self, fragment: int, round_index: int) -> None:
        future = self._rounds.pop((fragment, round_index), None)
        if future is not None:
            future.cancel()

    def abandon_all(self) -> None:
        for key in list(self._rounds):
            self.abandon(*key)

    async def _round(self, request: SyncRequest) -> SyncOutcome:
        began = time.monotonic()
        p, r = request.fragment, request.round
        me = pb.Member(
            peer_id=self.ctx.peer_id,
            address=self.ctx.address,
            client_only=self.ctx.client_only,
            weight=request.weight,
            global_hash=request.global_hash,
            step=request.step,
            joined_at=self.ctx.joined_at,
        )
        try:
            group, late = await self.matchmaker.form_group(p, r, me)
            if not late:
                await self.reducer.register(group)
            diverged = group.majority_hash != request.global_hash and not late
            if late:
                self.ctx.log.info(
                    "round (%d, %d): came %.1fs after the group's first member; "
                    "receiving only, and catching up",
                    p,
                    r,
                    group.behind_s,
                )
                self.behind_s = max(self.behind_s, group.behind_s)
            if diverged:
                self.ctx.log.warning(
                    "round (%d, %d): this peer's θ_g (%s) differs from the group's (%s); "
                    "receiving only, then repairing",
                    p,
                    r,
                    request.global_hash,
                    group.majority_hash,
                )
            delta = None if (late or diverged) else request.delta
            mean, contributors = await allreduce(
                self.ctx, self.reducer, group, delta, request.weight, self.wire
            )
        except RoundFailed as error:
            self.ctx.log.warning("round (%d, %d) failed: %s", p, r, error)
            return SyncFailed(str(error))
        adopt = None
        if (
            (late or diverged)
            and self.repair is not None
            and group.majority_hash != request.global_hash
        ):
            repaired = await self.repair(p, r, group.majority_hash)
            if repaired is None:
                return SyncFailed("θ_g differs from the group's and no peer could provide it")
            adopt, post_round = repaired
            if post_round:
                return SyncResult(
                    mean=None,
                    group_size=contributors,
                    adopt=adopt,
                    duration_s=time.monotonic() - began,
                )
        return SyncResult(
            mean=mean, group_size=contributors, adopt=adopt, duration_s=time.monotonic() - began
        )
