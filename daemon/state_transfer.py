"""Outer-state download: snapshots served in verified chunks, fetched from several donors.

A donor answers ``GetStateManifest`` with a snapshot of its outer state (θ_g and momentum
of every fragment, round counters, step, run config), each tensor cut into chunks with a
blake2b hash per chunk. The newcomer then pulls chunks with ``GetStateChunk`` from every
donor whose manifest lists the same hash for that chunk, in parallel; a chunk whose bytes
do not match its hash, or a donor that fails, is retried elsewhere. Donors serve at most
``MAX_CONCURRENT_CHUNKS`` chunks at once and refuse the rest (RESOURCE_EXHAUSTED) so a
crowd of newcomers spreads over donors instead of pinning one, and serving never touches
the training thread beyond taking the snapshot.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from grpc import aio

from locod.daemon.context import PeerContext
from locod.daemon.rpc import peer_pb2 as pb
from locod.daemon.rpc import peer_pb2_grpc

STATE_CHUNK_BYTES = 1024 * 1024
MAX_CONCURRENT_CHUNKS = 4
SNAPSHOT_TTL_S = 300.0


@dataclass(slots=True)
class Snapshot:
    """A consistent copy of the outer state, as raw little-endian fp32 bytes per tensor."""

    step: int
    rounds: list[int]
    global_hashes: list[str]
    config_json: str
    tensors: dict[str, bytes]
    version: int = 0
    """The outer state's version when taken: a snapshot is reused only while it holds."""
    snapshot_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created: float = field(default_factory=time.monotonic)


def chunk_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))


class StateServer:
    """The donor's side."""

    def __init__(
        self,
        ctx: PeerContext,
        take_snapshot: Callable[[list[int]], Snapshot],
        current_version: Callable[[], int],
    ) -> None:
        self.ctx = ctx
        self.take_snapshot = take_snapshot
        self.current_version = current_version
        self.snapshots: dict[str, Snapshot] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_CHUNKS)
        self._lock = asyncio.Lock()
        self.bytes_served = 0
        self.chunks_served = 0

    async def manifest(self, request: pb.StateManifestRequest) -> pb.StateManifest:
        fragments = sorted(set(request.fragments))
        async with self._lock:
            snapshot = self._recent(fragments)
            if snapshot is None:
                loop = asyncio.get_running_loop()
                snapshot = await loop.run_in_executor(
                    self.ctx.executor, self.take_snapshot, fragments
                )
                self.snapshots[snapshot.snapshot_id] = snapshot
            self._prune()
        tensors = []
        for name, data in snapshot.tensors.items():
            hashes = [
                chunk_hash(data[i : i + STATE_CHUNK_BYTES])
                for i in range(0, len(data), STATE_CHUNK_BYTES)
            ]
            tensors.append(
                pb.StateTensor(
                    name=name,
                    numel=len(data) // 4,
                    chunk_bytes=STATE_CHUNK_BYTES,
                    chunk_hashes=hashes,
                )
            )
        return pb.StateManifest(
            snapshot_id=snapshot.snapshot_id,
            config_json=snapshot.config_json,
            step=snapshot.step,
            rounds=snapshot.rounds,
            tensors=tensors,
            global_hashes=snapshot.global_hashes,
        )

    def _recent(self, fragments: list[int]) -> Snapshot | None:
        """A snapshot of the current state that covers ``fragments``, if one was taken.

        A crowd of newcomers shares one snapshot instead of each copying the state.
        """
        wanted = {f"global/{p}" for p in fragments}
        version = self.current_version()
        for snapshot in reversed(list(self.snapshots.values())):
            if snapshot.version == version and (not fragments or wanted <= set(snapshot.tensors)):
                return snapshot
        return None

    def _prune(self) -> None:
        cutoff = time.monotonic() - SNAPSHOT_TTL_S
        for key in [k for k, s in self.snapshots.items() if s.created < cutoff]:
            del self.snapshots[key]
        while len(self.snapshots) > 4:
            del self.snapshots[next(iter(self.snapshots))]

    async def chunk(
        self, request: pb.StateChunkRequest, context: aio.ServicerContext
    ) -> pb.StateChunk:
        snapshot = self.snapshots.get(request.snapshot_id)
        if snapshot is None or request.name not in snapshot.tensors:
            await context.abort(grpc.StatusCode.NOT_FOUND, "snapshot expired or unknown tensor")
            raise AssertionError("unreachable")
        data = snapshot.tensors[request.name]
        start = request.index * STATE_CHUNK_BYTES
        if request.index < 0 or start >= max(1, len(data)):
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"no chunk {request.index}")
        if self._slots.locked():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "this donor is serving its maximum; try another"
            )
        async with self._slots:
            piece = data[start : start + STATE_CHUNK_BYTES]
            self.bytes_served += len(piece)
            self.chunks_served += 1
            self.ctx.traffic.bytes_sent += len(piece)
            self.ctx.traffic.state_bytes_sent += len(piece)
            limit = self.ctx.faults.exit_after_chunks()
            if limit is not None and self.chunks_served > limit:
                self.ctx.log.error("fault injected: exiting while serving state")
                os._exit(137)
            return pb.StateChunk(data=piece)


class DownloadError(Exception):
    """No donor could provide the state."""


@dataclass(slots=True)
class Progress:
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.started)

    @property
    def eta_s(self) -> float:
        return (self.total - self.done) / self.rate if self.rate > 0 else float("inf")


@dataclass(slots=True)
class Downloaded:
    manifest: pb.StateManifest
    tensors: dict[str, torch.Tensor]
    donors_used: list[str]


async def download_state(
    ctx: PeerContext,
    donors: list[str],
    *,
    fragments: list[int] | None = None,
    progress: Progress | None = None,
) -> Downloaded:
    """Fetch a snapshot's tensors from ``donors`` (gRPC addresses) in verified chunks."""
    progress = progress or Progress()
    request = pb.StateManifestRequest(
        run=ctx.cfg.run_name, sender=ctx.peer_id, fragments=fragments or []
    )
    manifests: dict[str, pb.StateManifest] = {}

    refusals: list[str] = []

    async def ask(address: str) -> None:
        stub = peer_pb2_grpc.PeerStub(ctx.channel(address))
        try:
            manifests[address] = await stub.GetStateManifest(
                request, timeout=ctx.cfg.connect_timeout_s * 4
            )
        except grpc.aio.AioRpcError as error:
            ctx.log.info("donor %s gave no manifest: %s", address, error.code().name)
            refusals.append(f"{address}: {error.code().name} {error.details() or ''}".strip())

    await asyncio.gather(*(ask(a) for a in donors))
    if not manifests:
        raise DownloadError(
            f"none of {len(donors)} donor(s) answered with a state manifest ("
            + "; ".join(refusals)
            + ")"
        )
    primary_address = next(a for a in donors if a in manifests)
    primary = manifests[primary_address]
    hashes = {t.name: list(t.chunk_hashes) for t in primary.tensors}
    progress.total = sum(t.numel * 4 for t in primary.tensors)
    pieces: dict[tuple[str, int], bytes] = {}
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for tensor in primary.tensors:
        for index in range(len(tensor.chunk_hashes)):
            queue.put_nowait((tensor.name, index))
    donors_used: set[str] = set()

    def serves(address: str, name: str) -> bool:
        manifest = manifests[address]
        return any(
            t.name == name and list(t.chunk_hashes) == hashes[name] for t in manifest.tensors
        )

    async def worker(address: str) -> None:
        """Pull chunks this donor can serve until the queue is empty or it fails 3 times."""
        stub = peer_pb2_grpc.PeerStub(ctx.channel(address))
        snapshot_id = manifests[address].snapshot_id
        failures, busy, skipped = 0, 0, []
        while failures < 3 and busy < 50:
            try:
                name, index = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if not serves(address, name):
                skipped.append((name, index))
                continue
            try:
                reply = await stub.GetStateChunk(
                    pb.StateChunkRequest(
                        run=ctx.cfg.run_name, snapshot_id=snapshot_id, name=name, index=index
                    ),
                    timeout=ctx.cfg.chunk_timeout_s,
                )
            except grpc.aio.AioRpcError as error:
                queue.put_nowait((name, index))
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    busy += 1
                    await asyncio.sleep(0.05 * busy)
                else:
                    failures += 1
                    ctx.log.info("donor %s failed a chunk: %s", address, error.code().name)
                continue
            if chunk_hash(reply.data) != hashes[name][index]:
                ctx.log.warning("donor %s sent a chunk of %s that fails its hash", address, name)
                queue.put_nowait((name, index))
                failures += 1
                continue
            pieces[(name, index)] = reply.data
            donors_used.add(address)
            progress.done += len(reply.data)
            ctx.traffic.bytes_received += len(reply.data)
            ctx.traffic.state_bytes_received += len(reply.data)
        for item in skipped:
            queue.put_nowait(item)

    addresses = [a for a in donors if a in manifests]
    while not queue.empty():
        missing = queue.qsize()
        await asyncio.gather(*(worker(a) for a in addresses))
        if queue.qsize() >= missing:
            raise DownloadError(f"{queue.qsize()} chunk(s) could not be fetched from any donor")
    tensors = {}
    for tensor in primary.tensors:
        data = b"".join(pieces[(tensor.name, i)] for i in range(len(tensor.chunk_hashes)))
        if len(data) != tensor.numel * 4:
            raise DownloadError(
                f"{tensor.name}: got {len(data)} bytes, expected {tensor.numel * 4}"
            )
        tensors[tensor.name] = bytes_tensor(data)
    return Downloaded(manifest=primary, tensors=tensors, donors_used=sorted(donors_used))
