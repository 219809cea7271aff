"""Faults injected at a named peer and round (DESIGN I2, I3, §4): a peer that stalls
mid-round, and a peer whose chunks arrive corrupt."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cluster import Cluster, hashes

pytestmark = pytest.mark.slow

STEPS = 48
ROUND_TIMEOUT_S = 8.0
CHUNK_TIMEOUT_S = 2.0


def _round(status: dict[str, Any], fragment: int, round_index: int) -> dict[str, Any]:
    found = [r for r in status["rounds"] if r["fragment"] == fragment and r["round"] == round_index]
    assert found, f"no record of round ({fragment}, {round_index}) in {status['rounds']}"
    return found[-1]


@pytest.fixture(scope="module")
def faulty_trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("faults"))
    settings = [
        "--max-steps",
        str(STEPS),
        "--linger",
        "--min-peers",
        "3",
        "--eval-every",
        "0",
        "--chunk-timeout",
        str(CHUNK_TIMEOUT_S),
        "--round-timeout",
        str(ROUND_TIMEOUT_S),
        "--late-wait",
        "30",
    ]
    try:
        cluster.start("a", *settings)
        cluster.start("b", *settings, "--fault", "corrupt-send:fragment=0,round=2")
        cluster.start("c", *settings, "--fault", "stall-send:fragment=1,round=1")
        cluster.wait_all(lambda s: s["state"] == "finished", 300, "all three to finish")
        yield cluster
    finally:
        cluster.stop_all()


def test_a_stalled_peer_costs_the_others_at_most_the_timeouts(faulty_trio: Cluster) -> None:
    statuses = faulty_trio.statuses()
    for name in ("a", "b"):
        record = _round(statuses[name], 1, 1)
        assert record["outcome"] == "applied", (name, record)
        assert record["group_size"] == 2, (name, record)  # c's contribution was dropped
        assert CHUNK_TIMEOUT_S <= record["duration_s"] <= ROUND_TIMEOUT_S + 1, (name, record)
    stalled = _round(statuses["c"], 1, 1)
    assert stalled["outcome"] == "failed", stalled
    c_id = statuses["c"]["peer_id"]
    assert f"dropped {c_id}: stalled" in faulty_trio.peers["a"].log()
    # No round anywhere took longer than its deadline (I2).
    for name, status in statuses.items():
        longest = max(r["duration_s"] for r in status["rounds"])
        assert longest <= ROUND_TIMEOUT_S + 16, (name, longest)


def test_the_stalled_peer_repairs_its_copy_before_contributing_again(faulty_trio: Cluster) -> None:
    statuses = faulty_trio.statuses()
    assert _round(statuses["c"], 1, 2)["outcome"] == "repaired"
    assert statuses["c"]["repairs"] >= 1
    reference = hashes(statuses["a"])
    for name, status in statuses.items():
        assert hashes(status) == reference, f"{name} diverged"  # I1 after repair (I3)


def test_corrupt_chunks_are_rejected_for_that_round_only(faulty_trio: Cluster) -> None:
    statuses = faulty_trio.statuses()
    b_id = statuses["b"]["peer_id"]
    for name in ("a", "c"):
        assert f"rejected the contribution of {b_id}" in faulty_trio.peers[name].log(), name
    for name, status in statuses.items():
        record = _round(status, 0, 2)
        assert record["outcome"] == "applied", (name, record)
        assert record["group_size"] == 2, (name, record)
        # Every other round of fragment 0 had all three members.
        others = [r for r in status["rounds"] if r["fragment"] == 0 and r["round"] != 2]
        assert others and all(r["group_size"] == 3 for r in others), (name, others)
    for peer in faulty_trio.peers.values():
        assert peer.alive()
