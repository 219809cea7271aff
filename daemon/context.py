"""State shared by the network side of one daemon: identity, peers seen, channels, counters.

Everything here is touched only from the network thread's event loop, except the
counters, which the training thread reads (plain ints and floats: a torn read is harmless).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from locod.daemon.auth import client_interceptors
from locod.daemon.config import PROTOCOL_VERSION, SiteConfig
from locod.daemon.discovery import PeerRecord
from locod.daemon.faults import FaultPlan

CHUNK_BYTES = 512 * 1024
"""Stream chunk size: well under gRPC's 4 MiB message limit."""
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SUSPECT_S = 30.0
"""How long a peer that failed an RPC is left out of leader choice."""
HEARD_TTL_S = 30.0
"""How long a peer heard of only through JoinGroup counts as live (a DHT record's TTL)."""


@dataclass(slots=True)
class Traffic:
    """Payload bytes (chunks) this peer sent and received: rounds and state transfers."""

    bytes_sent: int = 0
    bytes_received: int = 0
    state_bytes_sent: int = 0
    """The part of ``bytes_sent`` that served state downloads (joiners, repairs)."""
    state_bytes_received: int = 0


@dataclass(slots=True)
class PeerContext:
    """Identity and shared services of one daemon's network side."""

    cfg: SiteConfig
    peer_id: str
    address: str
    """Announced gRPC address ('' when client-only)."""
    config_hash: str
    version: str
    log: logging.Logger
    executor: ThreadPoolExecutor
    faults: FaultPlan = field(default_factory=FaultPlan)
    traffic: Traffic = field(default_factory=Traffic)
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    """Latest view of live peers from the DHT (including this one)."""
    left: dict[str, float] = field(default_factory=dict)
    """Peers that said they left (out of rounds at once), with when they said it; a peer
    that comes back with the same id (a restart) is in again once its new record shows."""
    suspected: dict[str, float] = field(default_factory=dict)
    heard: dict[str, PeerRecord] = field(default_factory=dict)
    """Peers that joined a group we lead before their DHT record reached us (a newcomer
    that just finished its download): expected in the next rounds without waiting for
    the next DHT refresh, until their record shows or ``HEARD_TTL_S`` passes."""
    step: int = 0
    """This peer's current inner step (written by the training thread)."""
    joined_at: float = field(default_factory=time.time)
    dht_addrs: list[str] = field(default_factory=list)
    client_only: bool = False
    """True when this peer cannot accept connections (--client-only, or found at start)."""
    _channels: dict[str, aio.Channel] = field(default_factory=dict)

    @property
    def protocol(self) -> int:
        return PROTOCOL_VERSION

    def channel(self, address: str) -> aio.Channel:
        """A cached channel to ``address`` with auth and TLS as configured."""
        channel = self._channels.get(address)
        if channel is None:
            # No HTTP/2 keepalive: every call has its own deadline, and on a saturated slow
            # link keepalive pings wait behind the data, time out and kill transfers that
            # were progressing (seen at 16 Mbit/s in benchmarks/network.py).
            options = [
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
            interceptors = client_interceptors(self.cfg.key, self.peer_id)
            if self.cfg.tls_ca is not None:
                credentials = grpc.ssl_channel_credentials(self.cfg.tls_ca.read_bytes())
                channel = aio.secure_channel(
                    address, credentials, options=options, interceptors=interceptors
                )
            else:
                channel = aio.insecure_channel(address, options=options, interceptors=interceptors)
            self._channels[address] = channel
        return channel

    async def close_channels(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace=None)

    def suspect(self, peer_id: str, reason: str) -> None:
        """Leave a peer out of leader choice for a while after it failed us."""
        if peer_id and peer_id != self.peer_id:
            self.suspected[peer_id] = time.monotonic() + SUSPECT_S
            self.log.info(
                "peer %s is unreachable (%s); leaving it out for %.0fs", peer_id, reason, SUSPECT_S
            )

    def hear(self, record: PeerRecord) -> None:
        """A peer joined a group we lead: count it live now if the DHT has not shown it."""
        if record.peer_id == self.peer_id or self.has_left(record):
            return
        self.heard[record.peer_id] = record
        if record.peer_id not in self.peers:
            self.log.info(
                "peer %s joined a round before its DHT record reached us; expecting it "
                "in the next rounds",
                record.peer_id,
            )
            self.peers[record.peer_id] = record

    def with_heard(self, view: dict[str, PeerRecord]) -> dict[str, PeerRecord]:
        """``view`` from the DHT plus peers heard of recently that it does not show yet."""
        cutoff = time.time() - HEARD_TTL_S
        merged = dict(view)
        # list(): one atomic copy, since the event loop may add to ``heard`` meanwhile.
        for peer_id, record in list(self.heard.items()):
            if record.updated_at < cutoff or peer_id in view:
                self.heard.pop(peer_id, None)
            elif not self.has_left(record):
                merged[peer_id] = record
        return merged

    def live_peers(self) -> list[PeerRecord]:
        """Peers believed alive, oldest member first (the leader order)."""
        now = time.monotonic()
        for peer_id in [p for p, until in self.suspected.items() if until < now]:
            del self.suspected[peer_id]
        return sorted(
            (
                r
                for r in self.peers.values()
                if not self.has_left(r) and r.peer_id not in self.suspected
            ),
            key=lambda r: (r.joined_at, r.peer_id),
        )

    def ready_peers(self) -> list[PeerRecord]:
        """Live peers that hold the run's state and train, in leader order: only they lead
        rounds, serve state, or are waited for in a group (a newcomer still downloading is
        none of these)."""
        return [r for r in self.live_peers() if r.ready]

    def has_left(self, record: PeerRecord) -> bool:
        left_at = self.left.get(record.peer_id)
        return left_at is not None and record.joined_at <= left_at

    def info(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "address": self.address, "run": self.cfg.run_name}
