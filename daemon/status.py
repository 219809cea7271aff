"""The status service, and ``locod status``: what a daemon is doing, on request.

The training thread publishes its figures to a :class:`StatusBoard`; the gRPC status
service reads the board and the network counters, never the training state itself, so a
status query never waits on training.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from locod.daemon.context import PeerContext
from locod.daemon.rpc import status_pb2 as spb
from locod.daemon.rpc import status_pb2_grpc


@dataclass(slots=True)
class FragmentFigures:
    index: int
    round: int
    global_hash: str
    group_size: int
    duration_s: float
    outcome: str
    numel: int


@dataclass(slots=True)
class StatusBoard:
    """The latest training figures, written by the training thread."""

    state: str = "starting"
    note: str = ""
    step: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0
    train_loss: float = float("nan")
    eval_loss: float = float("nan")
    evals: list[tuple[int, float]] = field(default_factory=list)
    rounds_applied: int = 0
    rounds_failed: int = 0
    rounds_skipped: int = 0
    repairs: int = 0
    waited_s: float = 0.0
    training_s: float = 0.0
    fragments: list[FragmentFigures] = field(default_factory=list)
    rounds: list[tuple[int, int, int, float, str]] = field(default_factory=list)
    """(fragment, round, group size, duration, outcome) of the latest rounds."""
    download_done: int = 0
    download_total: int = 0
    dht_addrs: list[str] = field(default_factory=list)
    join_command: str = ""
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, **figures: Any) -> None:
        with self.lock:
            for name, value in figures.items():
                setattr(self, name, value)

    @property
    def wait_fraction(self) -> float:
        """Share of training wall time spent blocked on the network (I4)."""
        return self.waited_s / self.training_s if self.training_s > 0 else 0.0


def build_reply(board: StatusBoard, ctx: PeerContext) -> spb.StatusReply:
    with board.lock:
        return spb.StatusReply(
            peer_id=ctx.peer_id,
            run=ctx.cfg.run_name,
            step=board.step,
            tokens=board.tokens,
            listen=ctx.address,
            dht_addrs=list(board.dht_addrs),
            peers=[
                spb.KnownPeer(
                    peer_id=r.peer_id,
                    address=r.address,
                    client_only=r.client_only,
                    step=r.step,
                    tokens_per_s=r.tokens_per_s,
                )
                for r in ctx.live_peers()
            ],
            bytes_sent=ctx.traffic.bytes_sent,
            bytes_received=ctx.traffic.bytes_received,
            state_bytes_sent=ctx.traffic.state_bytes_sent,
            state_bytes_received=ctx.traffic.state_bytes_received,
            wait_fraction=board.wait_fraction,
            fragments=[
                spb.FragmentStatus(
                    index=f.index,
                    round=f.round,
                    global_hash=f.global_hash,
                    group_size=f.group_size,
                    duration_s=f.duration_s,
                    outcome=f.outcome,
                    numel=f.numel,
                )
                for f in board.fragments
            ],
            tokens_per_s=board.tokens_per_s,
            train_loss=board.train_loss,
            eval_loss=board.eval_loss,
            rounds_applied=board.rounds_applied,
            rounds_failed=board.rounds_failed,
            rounds_skipped=board.rounds_skipped,
            waited_s=board.waited_s,
            uptime_s=time.monotonic() - board.started,
            client_only=ctx.client_only,
            repairs=board.repairs,
            state=board.state,
            version=ctx.version,
            config_hash=ctx.config_hash,
            download_done=board.download_done,
            download_total=board.download_total,
            join_command=board.join_command,
            evals=[spb.EvalPoint(step=s, loss=loss) for s, loss in board.evals[-100:]],
            note=board.note,
            rounds=[
                spb.RoundStatus(fragment=f, round=r, group_size=g, duration_s=d, outcome=o)
                for f, r, g, d, o in board.rounds[-200:]
            ],
        )


class StatusService(status_pb2_grpc.StatusServicer):
    def __init__(self, board: StatusBoard, ctx: PeerContext) -> None:
        self.board = board
        self.ctx = ctx

    async def GetStatus(
        self, request: spb.StatusRequest, context: aio.ServicerContext
    ) -> spb.StatusReply:
        return build_reply(self.board, self.ctx)


class StatusUnavailable(Exception):
    """The daemon could not be reached or refused the query."""


def query_status(
    address: str, *, key: str = "", timeout_s: float = 5.0, tls_ca: bytes | None = None
) -> dict[str, Any]:
    """Ask the daemon at ``address`` for its status, as a JSON-ready dict."""
    import asyncio

    from locod.daemon.auth import client_interceptors

    async def ask() -> spb.StatusReply:
        interceptors = client_interceptors(key, "locod-status")
        if tls_ca is not None:
            channel = aio.secure_channel(
                address, grpc.ssl_channel_credentials(tls_ca), interceptors=interceptors
            )
        else:
            channel = aio.insecure_channel(address, interceptors=interceptors)
        async with channel:
            stub = status_pb2_grpc.StatusStub(channel)
            return await stub.GetStatus(spb.StatusRequest(), timeout=timeout_s)

    try:
        reply = asyncio.run(ask())
    except grpc.aio.AioRpcError as error:
        detail = error.details() or error.code().name
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise StatusUnavailable(f"the daemon at {address} refused: {detail} (--key)") from None
        raise StatusUnavailable(f"cannot reach a locod daemon at {address}: {detail}") from None
    return message_to_dict(reply)


def message_to_dict(message: Any) -> dict[str, Any]:
    """Every field of a message as plain Python values (int64 stays an int, unlike
    protobuf's JSON mapping, which turns it into a string)."""
    out: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        value = getattr(message, descriptor.name)
        repeated = (
            not isinstance(value, str | bytes)
            and hasattr(value, "__len__")
            and not hasattr(value, "DESCRIPTOR")
        )
        if descriptor.message_type is not None:
            out[descriptor.name] = (
                [message_to_dict(item) for item in value] if repeated else message_to_dict(value)
            )
        else:
            out[descriptor.name] = list(value) if repeated else value
    return out


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def render_status(status: dict[str, Any]) -> str:
    """The human table of ``locod status``."""

    def number(key: str, digits: int = 3) -> str:
        value = status.get(key)
        if isinstance(value, int | float):
            return f"{value:.{digits}f}"
        return str(value)

    lines = [
        f"peer {status['peer_id']}  run {status['run']}  {status['state']}"
        + (" (client-only)" if status.get("client_only") else "")
        + (f"  — {status['note']}" if status.get("note") else ""),
        f"  step {status['step']}  tokens {int(status['tokens']):,}  "
        f"{float(status['tokens_per_s']):,.0f} tok/s  train loss {number('train_loss')}  "
        f"eval loss {number('eval_loss')}",
        f"  rounds applied {status['rounds_applied']}  failed {status['rounds_failed']}  "
        f"skipped {status['rounds_skipped']}  repairs {status['repairs']}  "
        f"waited {float(status['waited_s']):.1f}s ({100 * float(status['wait_fraction']):.1f}%)",
        f"  sent {_bytes(float(status['bytes_sent']))}  received "
        f"{_bytes(float(status['bytes_received']))}",
        f"  gRPC {status['listen'] or '(client-only)'}",
    ]
    lines += [f"  DHT  {addr}" for addr in status.get("dht_addrs", [])]
    if int(status.get("download_total", 0)):
        lines.append(
            f"  state download {_bytes(float(status['download_done']))} / "
            f"{_bytes(float(status['download_total']))}"
        )
    lines.append(f"  peers ({len(status['peers'])}):")
    for peer in status["peers"]:
        lines.append(
            f"    {peer['peer_id']}  {peer['address'] or '(client-only)'}  "
            f"step {peer['step']}  {float(peer['tokens_per_s']):,.0f} tok/s"
        )
    lines.append("  fragment  round  group  duration  outcome   global hash")
    for fragment in status["fragments"]:
        lines.append(
            f"  {fragment['index']:>8}  {fragment['round']:>5}  "
            f"{fragment['group_size']:>5}  {float(fragment['duration_s']):>7.2f}s  "
            f"{fragment['outcome']:<8}  {fragment['global_hash']}"
        )
    return "\n".join(lines)
