"""Volunteers join and leave (DESIGN I2, I3, I5): a newcomer mid-run, a peer killed mid-round,
a peer stopped and restarted from its state dir, a repaired copy, peers behind NAT."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from cluster import Cluster, hashes, wait_for

pytestmark = pytest.mark.slow

ROUND_TIMEOUT_S = 8.0
SLOW = ("--fault", "slow-step:seconds=0.04")


def _finished(status: dict[str, Any]) -> bool:
    return status["state"] == "finished"


def _evals(status: dict[str, Any]) -> list[float]:
    return [e["loss"] for e in status["evals"]]


def test_a_newcomer_downloads_the_state_and_matches_every_fragment(tmp_path: Any) -> None:
    """Three peers train; b will die when asked for its first state chunk; d joins mid-run,
    downloads from a and c (resuming b's share elsewhere) and matches them."""
    cluster = Cluster(tmp_path)
    # Long enough that d, started at step 40, still has rounds left on a loaded machine
    # where its start-up (imports, DHT, download) takes a hundred steps of the others'.
    steps = 300
    common = ["--max-steps", str(steps), "--linger", "--eval-every", "0", *SLOW]
    try:
        cluster.start("a", *common, "--min-peers", "3")
        cluster.start("c", *common, "--min-peers", "3")
        # b joins last, so nobody downloads from it before d does.
        cluster.start("b", *common, "--min-peers", "3", "--fault", "exit-serving:chunks=0")
        cluster.wait_all(lambda s: s["step"] >= 40, 120, "the run to be under way")
        b_address = cluster.peers["b"].address()
        newcomer = cluster.start("d", *common)
        statuses = cluster.wait_all(_finished, 240, "a, c and d to finish", names=["a", "c", "d"])
        assert cluster.peers["b"].process.wait(30) == 137  # the donor died mid-download
        d = statuses["d"]
        log = newcomer.log()
        assert d["download_total"] > 0 and d["download_done"] == d["download_total"]
        assert f"donor {b_address} failed a chunk" in log
        started = re.search(r"downloaded \d+ bytes of state from (.*?) in .*step 0 → (\d+)", log)
        assert started is not None, log
        assert b_address not in started.group(1)
        assert int(started.group(2)) >= 40, "the newcomer should start at the run's step"
        assert hashes(d) == hashes(statuses["a"]) == hashes(statuses["c"])
        # The newcomer is a full member of the groups soon after its first join (the
        # leader expects it from then on, before its DHT record arrives), to the end.
        applied = [r for r in d["rounds"] if r["outcome"] == "applied"]
        assert applied and applied[-1]["group_size"] == 3, d["rounds"]
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """Four peers; d dies (like SIGKILL) mid-round; c is stopped and restarted; e joins."""
    cluster = Cluster(tmp_path_factory.mktemp("chaos"))
    steps = 400
    common = [
        "--max-steps",
        str(steps),
        "--linger",
        "--eval-every",
        "20",
        "--round-timeout",
        str(ROUND_TIMEOUT_S),
        "--chunk-timeout",
        "2",
        "--late-wait",
        "20",
        *SLOW,
    ]
    events: dict[str, Any] = {}
    try:
        for name in ("a", "b", "c"):
            cluster.start(name, *common, "--min-peers", "4")
        cluster.start(
            "d", *common, "--min-peers", "4", "--fault", "exit-in-round:fragment=1,round=3"
        )
        d = cluster.peers["d"]
        wait_for(lambda: d.process.poll() is not None, 180, "d to die in round (1, 3)")
        events["d_exit"] = d.process.returncode
        c = cluster.peers["c"]
        wait_for(lambda: c.status()["step"] >= 90, 120, "c to reach step 90")
        events["eval_before"] = _evals(cluster.peers["a"].status())[-1]
        events["c_stop"] = c.stop()
        cluster.start("c", *common, fresh=False)  # restarted from its state dir
        cluster.start("e", *common)  # a newcomer joins
        events["statuses"] = cluster.wait_all(
            _finished, 300, "the survivors to finish", names=["a", "b", "c", "e"]
        )
        yield cluster, events
    finally:
        cluster.stop_all()


def test_a_peer_killed_mid_round_does_not_stop_the_round(
    chaos: tuple[Cluster, dict[str, Any]],
) -> None:
    _, events = chaos
    assert events["d_exit"] == 137
    statuses = events["statuses"]
    for name in ("a", "b"):
        record = [r for r in statuses[name]["rounds"] if (r["fragment"], r["round"]) == (1, 3)]
        assert record and record[-1]["outcome"] == "applied", (name, statuses[name]["rounds"])
        assert record[-1]["group_size"] >= 2


def test_after_chaos_every_live_peer_holds_identical_outer_state(
    chaos: tuple[Cluster, dict[str, Any]],
) -> None:
    _, events = chaos
    statuses = events["statuses"]
    reference = hashes(statuses["a"])
    for name, status in statuses.items():
        assert hashes(status) == reference, f"{name} diverged"


def test_no_round_waited_longer_than_its_timeout_and_loss_kept_falling(
    chaos: tuple[Cluster, dict[str, Any]],
) -> None:
    cluster, events = chaos
    code, seconds = events["c_stop"]
    assert code == 0 and seconds < 10
    for name, status in events["statuses"].items():
        longest = max(r["duration_s"] for r in status["rounds"])
        assert longest <= ROUND_TIMEOUT_S + 20, (name, longest)  # window + timeout
    final = _evals(events["statuses"]["a"])[-1]
    assert final < events["eval_before"], (events["eval_before"], final)
    c_log = cluster.peers["c"].log()
    assert "resumed from the checkpoint" in c_log and "downloaded" in c_log


@pytest.fixture(scope="module")
def nat_and_repair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """a, b: normal (b's copy of fragment 2 is damaged after round 1); c: --client-only;
    d: announces an address nobody can reach, so it must find out it is behind NAT."""
    cluster = Cluster(tmp_path_factory.mktemp("nat"))
    common = ["--max-steps", "64", "--linger", "--eval-every", "0", "--min-peers", "4"]
    try:
        cluster.start("a", *common)
        cluster.start("b", *common, "--fault", "perturb-global:fragment=2,round=1")
        cluster.start("c", *common, "--client-only")
        cluster.start("d", *common, "--announce", "127.0.0.1:9")
        cluster.wait_all(_finished, 240, "all four to finish")
        yield cluster
    finally:
        cluster.stop_all()


def test_a_damaged_copy_is_repaired_before_its_next_contribution(nat_and_repair: Cluster) -> None:
    statuses = nat_and_repair.statuses()
    b = statuses["b"]
    nxt = [r for r in b["rounds"] if (r["fragment"], r["round"]) == (2, 2)]
    assert nxt and nxt[-1]["outcome"] == "repaired", b["rounds"]
    assert b["repairs"] >= 1
    reference = hashes(statuses["a"])
    for name, status in statuses.items():
        assert hashes(status) == reference, f"{name} diverged"
    # The damaged copy never contributed: round (2, 2) has the other three members.
    a_round = [r for r in statuses["a"]["rounds"] if (r["fragment"], r["round"]) == (2, 2)]
    assert a_round[-1]["group_size"] == 3


def test_client_only_peers_contribute_without_reducing(nat_and_repair: Cluster) -> None:
    statuses = nat_and_repair.statuses()
    assert statuses["c"]["client_only"] and not statuses["c"]["listen"]
    assert statuses["d"]["client_only"], "d should have found nobody can reach it"
    assert "taking part client-only" in nat_and_repair.peers["d"].log()
    assert "takes part client-only" in nat_and_repair.peers["a"].log()
    for name, status in statuses.items():
        sizes = [
            r["group_size"]
            for r in status["rounds"]
            if r["outcome"] == "applied" and not (r["fragment"] == 2 and r["round"] == 2)
        ]
        assert sizes and all(size == 4 for size in sizes), (name, status["rounds"])
    for name in ("c", "d"):
        log = nat_and_repair.peers[name].log()
        assert "dropped" not in log and "rejected" not in log  # they reduce nothing


def test_sigterm_during_training_stops_within_ten_seconds(tmp_path: Any) -> None:
    cluster = Cluster(tmp_path)
    try:
        peer = cluster.start("solo", "--eval-every", "0", *SLOW)
        wait_for(lambda: peer.status()["step"] >= 10, 120, "training to start")
        peer.signal(signal.SIGTERM)
        code = peer.process.wait(10)
        assert code == 0
        assert "checkpoint at step" in peer.log()
        restarted = cluster.start("solo", "--eval-every", "0", *SLOW, fresh=False, join=False)
        wait_for(lambda: restarted.status()["step"] >= 12, 120, "the restart to resume")
        assert "resumed from the checkpoint" in restarted.log()
    finally:
        cluster.stop_all()


def test_peers_of_different_speeds_stay_in_one_run(tmp_path: Any) -> None:
    """A peer eight times slower than the others: its rounds weigh by the tokens it
    trained, the fast peers wait for it at most the matchmaking window per round, and the
    run stays consistent."""
    window = 3.0
    cluster = Cluster(tmp_path)
    common = [
        "--max-steps",
        "96",
        "--linger",
        "--eval-every",
        "0",
        "--min-peers",
        "3",
        "--matchmaking-window",
        str(window),
    ]
    try:
        cluster.start("fast1", *common, "--fault", "slow-step:seconds=0.02")
        cluster.start("fast2", *common, "--fault", "slow-step:seconds=0.02")
        cluster.start("slow", *common, "--fault", "slow-step:seconds=0.16")
        statuses = cluster.wait_all(_finished, 300, "all three to finish")
        reference = hashes(statuses["fast1"])
        for name, status in statuses.items():
            assert hashes(status) == reference, f"{name} diverged"
        for name in ("fast1", "fast2"):
            status = statuses[name]
            # Every wait for a result is bounded by the window plus a round's own work.
            longest = max(r["duration_s"] for r in status["rounds"])
            assert longest <= window + 5, (name, longest)
            assert status["rounds_failed"] == 0, status["rounds"]
        # The slow peer stays within the window, so it is in every group: the fast peers
        # slow down to its pace (they waited on the network) instead of leaving it behind.
        assert all(r["group_size"] == 3 for r in statuses["fast1"]["rounds"])
        assert statuses["fast1"]["waited_s"] > statuses["slow"]["waited_s"]
    finally:
        cluster.stop_all()
