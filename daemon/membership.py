"""Who is in the run, as this site sees it: its own DHT record, and everyone else's.

The site publishes its :class:`~locod.daemon.discovery.PeerRecord` (address, step,
throughput, readiness) every ``REFRESH_S`` and reads everyone's back into
``PeerContext.peers``, which leader choice, donors and the status service read. Records
expire unless refreshed, so a peer that dies silently drops out of the view within the
record TTL. ``wait_for_peers`` holds a run's first peers until ``--min-peers`` are ready;
``check_reachable`` asks peers to dial this one back and, when nobody can, turns it
client-only (it sends and receives over connections it opens, and reduces nothing).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from locod.daemon.context import PeerContext
from locod.daemon.discovery import Discovery, PeerRecord
from locod.daemon.network import NetworkThread
from locod.daemon.rpc import peer_pb2 as pb
from locod.daemon.rpc import peer_pb2_grpc
from locod.daemon.status import StatusBoard

REFRESH_S = 5.0
"""Seconds between two publications of this peer's record and two reads of the run's."""


class Membership:
    """This site's record in the DHT and its view of the other peers."""

    def __init__(
        self,
        ctx: PeerContext,
        discovery: Discovery,
        network: NetworkThread,
        board: StatusBoard,
        log: logging.Logger,
    ) -> None:
        self.ctx = ctx
        self.discovery = discovery
        self.network = network
        self.board = board
        self.log = log
        self.ready = False
        """Holds the run's state and trains (a newcomer is not ready while downloading)."""
        self._told_client_only: set[str] = set()

    def record(self, *, left: bool = False) -> PeerRecord:
        return PeerRecord(
            peer_id=self.ctx.peer_id,
            address=self.ctx.address,
            client_only=self.ctx.client_only,
            version=self.ctx.version,
            config_hash=self.ctx.config_hash,
            step=self.ctx.step,
            tokens_per_s=self.board.tokens_per_s,
            joined_at=self.ctx.joined_at,
            left=left,
            ready=self.ready,
        )

    def publish(self, *, left: bool = False) -> None:
        """Store this peer's record (blocking: call from a thread, not the event loop)."""
        record = self.record(left=left)
        self.discovery.publish(record)
        if not left:
            self.ctx.peers[record.peer_id] = record

    def refresh_now(self) -> None:
        """Read the run's live peers from the DHT into the shared view (blocking)."""
        ctx = self.ctx
        peers = self.discovery.peers()
        view = {r.peer_id: r for r in peers if not ctx.has_left(r)}
        view[ctx.peer_id] = self.record()  # our own view of ourselves is the freshest
        for record in view.values():
            if record.client_only and record.peer_id not in self._told_client_only:
                self._told_client_only.add(record.peer_id)
                if record.peer_id != ctx.peer_id:
                    self.log.info(
                        "peer %s takes part client-only (it cannot accept connections): it "
                        "contributes but reduces nothing. To make it reachable, start it with "
                        "--listen HOST:PORT --announce PUBLIC_HOST:PORT and open that port.",
                        record.peer_id,
                    )
        ctx.peers = ctx.with_heard(view)

    async def refresh_loop(self) -> None:
        """Keep our record fresh and our view of the run current, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.publish)
                await loop.run_in_executor(None, self.refresh_now)
            except Exception as error:
                self.log.warning("DHT refresh failed: %s", error)
            await asyncio.sleep(REFRESH_S)

    def wait_for_peers(
        self, min_peers: int, stop: threading.Event, redraw: Callable[[], None]
    ) -> None:
        """Say we are ready; with ``min_peers`` > 1, wait until that many are ready to train.

        Counting only ready peers (not ones still downloading the state) lets a run's
        first peers start their first round together.
        """
        self.ready = True
        self.publish()
        if min_peers <= 1:
            return
        self.board.update(state="waiting", note=f"waiting for {min_peers} peers")
        while not stop.is_set():
            self.refresh_now()
            count = len(self.ctx.ready_peers())
            self.board.update(note=f"{count}/{min_peers} peers ready")
            redraw()
            if count >= min_peers:
                break
            stop.wait(0.3)
        self.board.update(note="")

    def check_reachable(self) -> None:
        """Ask a peer to dial us back; if nobody can, take part client-only (behind NAT)."""
        ctx = self.ctx
        self.refresh_now()
        others = [r for r in ctx.ready_peers() if r.peer_id != ctx.peer_id and r.address]
        if not others:
            return

        async def ask(address: str) -> bool:
            stub = peer_pb2_grpc.PeerStub(ctx.channel(address))
            request = pb.DialBackRequest(run=ctx.cfg.run_name, address=ctx.address)
            try:
                reply = await stub.DialBack(request, timeout=3 * ctx.cfg.connect_timeout_s)
            except Exception:
                return False
            return bool(reply.reachable)

        async def ask_some() -> bool:
            answers = await asyncio.gather(*(ask(r.address) for r in others[:3]))
            return any(answers)

        if self.network.call(ask_some(), timeout_s=4 * ctx.cfg.connect_timeout_s + 5):
            return
        self.log.warning(
            "no peer could connect back to %s: taking part client-only (this peer sends and "
            "receives over connections it opens, and reduces nothing). To be reachable, "
            "start with --listen HOST:PORT --announce PUBLIC_HOST:PORT and open that port.",
            ctx.address,
        )
        ctx.client_only = True
        ctx.address = ""
        self.publish()

    async def leave(self) -> None:
        """Tell every known peer we are gone, so they leave us out of the next round."""
        ctx = self.ctx
        notice = pb.LeaveNotice(run=ctx.cfg.run_name, peer_id=ctx.peer_id)

        async def tell(address: str) -> None:
            stub = peer_pb2_grpc.PeerStub(ctx.channel(address))
            try:
                await stub.Leave(notice, timeout=1.0)
            except Exception as error:  # a peer already gone cannot be told
                self.log.debug("could not tell %s we leave: %s", address, error)

        await asyncio.gather(
            *(tell(r.address) for r in ctx.live_peers() if r.peer_id != ctx.peer_id and r.address)
        )
