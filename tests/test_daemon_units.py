"""The daemon's pure pieces: part boundaries, group agreement data, faults, settings."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from locod.daemon.allreduce import max_payload_bytes, part_bounds
from locod.daemon.config import differing_settings
from locod.daemon.context import PeerContext
from locod.daemon.discovery import PeerRecord
from locod.daemon.faults import FaultPlan, parse_fault
from locod.daemon.matchmaking import Group, GroupRegistry, RoundFailed, make_group
from locod.daemon.rpc import peer_pb2 as pb
from locod.peer.codec import WireFormat, decode, encode


@pytest.mark.parametrize(
    ("numel", "parts", "align"),
    [(1000, 3, 64), (64, 4, 64), (1, 2, 64), (129, 2, 64), (10_000, 7, 2)],
)
def test_parts_cover_the_tensor_on_block_boundaries(numel: int, parts: int, align: int) -> None:
    bounds = part_bounds(numel, parts, align)
    assert len(bounds) == parts
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    for (_, end), (start, _) in itertools.pairwise(bounds):
        assert end == start
    for start, end in bounds:
        assert start <= end and (start % align == 0 or start == numel)


def test_parts_encode_exactly_like_the_whole_tensor() -> None:
    # Cutting on block boundaries means each reducer's part quantizes as it would in the
    # whole fragment: the simulator and the daemon produce the same values.
    x = torch.randn(1000)
    wire = WireFormat(codec="fp4", block_size=64, zstd_level=0)
    whole = decode(encode(x, wire))
    pieces = torch.cat([decode(encode(x[a:b], wire)) for a, b in part_bounds(1000, 3, 64)])
    assert torch.equal(whole, pieces)


def test_payload_bound_admits_every_honest_encoding() -> None:
    x = torch.randn(5000)
    for codec in ("fp4", "int8", "bf16", "fp32"):
        for level in (0, 3):
            assert len(encode(x, WireFormat(codec=codec, zstd_level=level))) <= max_payload_bytes(
                5000
            )


def _member(peer_id: str, digest: str, client_only: bool = False) -> pb.Member:
    return pb.Member(
        peer_id=peer_id,
        address="" if client_only else f"{peer_id}:1",
        client_only=client_only,
        weight=1.0,
        global_hash=digest,
    )


def test_a_group_orders_members_and_takes_the_majority_hash() -> None:
    members = {
        m.peer_id: m
        for m in (_member("c", "h1"), _member("a", "h2"), _member("b", "h1", client_only=True))
    }
    group = make_group(2, 5, members, leader="a", run_step=40)
    assert group.member_ids() == ["a", "b", "c"]
    assert [m.peer_id for m in group.reducers] == ["a", "c"]  # client-only reduces nothing
    assert group.majority_hash == "h1"
    again = Group.from_reply(group.reply(pb.GroupReply.OK), 2, 5)
    assert again.member_ids() == group.member_ids() and again.group_id == group.group_id


def test_a_malformed_member_list_is_refused() -> None:
    reply = pb.GroupReply(status=pb.GroupReply.OK, members=[_member("b", "x"), _member("a", "x")])
    with pytest.raises(RoundFailed, match="malformed"):
        Group.from_reply(reply, 0, 0)


def test_faults_parse_and_match() -> None:
    plan = FaultPlan.parse(
        (
            "stall-send:fragment=1,round=2",
            "slow-step:seconds=0.5",
            "corrupt-send:fragment=*,round=3",
            "exit-serving:chunks=0",
        )
    )
    assert plan.active("stall-send", 1, 2) and not plan.active("stall-send", 1, 3)
    assert plan.active("corrupt-send", 7, 3)
    assert plan.step_delay_s() == 0.5
    assert plan.exit_after_chunks() == 0
    assert FaultPlan().exit_after_chunks() is None
    for bad in ("explode", "stall-send:fragment=x", "stall-send:colour=red"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_only_explicit_run_settings_can_contradict_the_run() -> None:
    run = {"inner_steps": 8, "alpha": 0.5, "fragments": 3}
    ours = {"inner_steps": 16, "alpha": 0.5, "fragments": 0}
    assert differing_settings(run, ours, frozenset()) == []
    assert differing_settings(run, ours, frozenset({"inner_steps", "fragments"})) == [
        "inner_steps: this peer has 16, the run has 8"
    ]


def _context(peer_id: str, window_s: float = 5.0) -> PeerContext:
    cfg = SimpleNamespace(matchmaking_window_s=window_s)
    return PeerContext(
        cfg=cfg,  # type: ignore[arg-type]
        peer_id=peer_id,
        address="127.0.0.1:1",
        config_hash="run",
        version="test",
        log=logging.getLogger("test"),
        executor=None,  # type: ignore[arg-type]
    )


def _record(peer_id: str, joined_at: float) -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id,
        address=f"{peer_id}:1",
        client_only=False,
        version="test",
        config_hash="run",
        step=0,
        tokens_per_s=0.0,
        joined_at=joined_at,
        ready=True,
        updated_at=time.time(),
    )


def test_a_leader_expects_a_newcomer_from_its_first_join_on() -> None:
    """A newcomer whose DHT record has not reached the leader comes too late for one round,
    and is a full member of the next: the leader does not wait for its next DHT refresh."""
    ctx = _context("a")
    ctx.peers = {"a": _record("a", 1.0)}
    registry = GroupRegistry(ctx, on_close=lambda group: None)

    def member(peer_id: str) -> pb.Member:
        return pb.Member(peer_id=peer_id, address=f"{peer_id}:1", joined_at=5.0, weight=1.0)

    async def rounds() -> tuple[pb.GroupReply, pb.GroupReply, list[str]]:
        alone = await registry.join(0, 0, member("a"))  # a knows only itself: closes at once
        assert [m.peer_id for m in alone.members] == ["a"]
        late = await registry.join(0, 0, member("d"))
        leader_waits = asyncio.create_task(registry.join(0, 1, member("a")))
        await asyncio.sleep(0.05)
        assert not leader_waits.done(), "the leader should now wait for d"
        joined = await registry.join(0, 1, member("d"))
        await leader_waits
        return late, joined, [r.peer_id for r in ctx.live_peers()]

    late, joined, live = asyncio.run(rounds())
    assert late.status == pb.GroupReply.TOO_LATE
    assert joined.status == pb.GroupReply.OK and [m.peer_id for m in joined.members] == ["a", "d"]
    assert live == ["a", "d"], "the newcomer orders after the older leader"


def test_heard_peers_give_way_to_the_dht_and_expire() -> None:
    ctx = _context("a")
    dht_view = {"a": _record("a", 1.0)}
    ctx.hear(_record("d", 5.0))
    assert set(ctx.with_heard(dht_view)) == {"a", "d"}, "heard, not yet in the DHT"
    fresh = replace(_record("d", 5.0), step=42)
    assert ctx.with_heard(dht_view | {"d": fresh})["d"].step == 42, "the DHT record wins"
    assert "d" not in ctx.heard
    ctx.hear(replace(_record("d", 5.0), updated_at=time.time() - 1000))
    assert set(ctx.with_heard(dht_view)) == {"a"}, "a peer heard of long ago has expired"
    ctx.left["e"] = 10.0
    ctx.hear(_record("e", 6.0))
    assert set(ctx.with_heard(dht_view)) == {"a"}, "a peer that left is not heard again"
