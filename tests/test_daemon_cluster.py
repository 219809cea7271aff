"""Three real daemons on loopback: consistency (I1), overlap accounting (I4), clean stops."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import LOCOD, Cluster, hashes

pytestmark = pytest.mark.slow

STEPS = 48


@pytest.fixture(scope="module")
def finished_trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("trio"))
    settings = ["--max-steps", str(STEPS), "--linger", "--min-peers", "3", "--eval-every", "16"]
    try:
        for name in ("a", "b", "c"):
            cluster.start(name, *settings)
        cluster.wait_all(lambda s: s["state"] == "finished", 240, "all three to finish")
        yield cluster
    finally:
        cluster.stop_all()


def test_every_peer_applied_the_same_rounds_with_identical_outer_state(
    finished_trio: Cluster,
) -> None:
    statuses = finished_trio.statuses()
    reference = hashes(statuses["a"])
    assert len(reference) == 3
    # H = 8, P = 3: offsets 0, 2, 5; 48 steps give rounds 0..5, 0..4 and 0..4.
    assert {p: r for p, (r, _) in reference.items()} == {0: 5, 1: 4, 2: 4}
    for name, status in statuses.items():
        assert status["step"] == STEPS, name
        assert hashes(status) == reference, f"{name} diverged from a"  # I1


def test_every_round_had_all_three_members(finished_trio: Cluster) -> None:
    for name, status in finished_trio.statuses().items():
        rounds = status["rounds"]
        assert len(rounds) == 16, name
        assert all(r["outcome"] == "applied" for r in rounds), (name, rounds)
        assert [r["group_size"] for r in rounds] == [3] * 16, (name, rounds)


def test_loss_went_down_and_traffic_and_waits_are_reported(finished_trio: Cluster) -> None:
    for name, status in finished_trio.statuses().items():
        evals = [e["loss"] for e in status["evals"]]
        assert len(evals) >= 3, name
        assert evals[-1] < evals[0] - 0.3, (name, evals)
        assert status["bytes_sent"] > 0 and status["bytes_received"] > 0, name
        assert 0.0 <= status["wait_fraction"] < 1.0, name
        assert len(status["peers"]) == 3, name
        assert status["dht_addrs"] and status["listen"], name


def test_status_cli_prints_json_and_a_table(finished_trio: Cluster) -> None:
    peer = finished_trio.peers["b"]
    out = subprocess.run(
        [*LOCOD, "status", peer.address(), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    status = json.loads(out.stdout)
    for key in (
        "peer_id",
        "run",
        "step",
        "tokens",
        "listen",
        "dht_addrs",
        "peers",
        "bytes_sent",
        "bytes_received",
        "wait_fraction",
        "fragments",
    ):
        assert key in status, key
    assert {"index", "round", "global_hash"} <= set(status["fragments"][0])
    table = subprocess.run(
        [*LOCOD, "status", "--state-dir", str(peer.state_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert status["peer_id"] in table and "global hash" in table


def test_status_of_an_unreachable_daemon_is_one_clear_line() -> None:
    out = subprocess.run(  # noqa: PLW1510 - the exit code is what is tested
        [*LOCOD, "status", "127.0.0.1:9", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0
    assert "cannot reach a locod daemon at 127.0.0.1:9" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_joiner_contradicting_the_run_config_is_refused_naming_each_setting(
    finished_trio: Cluster, tmp_path: Path
) -> None:
    args = [
        *LOCOD,
        "start",
        *finished_trio.common,
        "--state-dir",
        str(tmp_path / "x"),
        "--cache-dir",
        str(finished_trio.root / "cache"),
        "--join",
        finished_trio.peers["a"].address(),
        "--inner-steps",
        "16",
        "--alpha",
        "0.3",
    ]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0
    assert "inner_steps: this peer has 16, the run has 8" in out.stderr
    assert "alpha: this peer has 0.3, the run has 0.5" in out.stderr
    assert "Traceback" not in out.stderr


def test_sigterm_stops_every_daemon_cleanly_and_promptly(finished_trio: Cluster) -> None:
    for name in ("c", "b", "a"):
        code, seconds = finished_trio.peers[name].stop()
        assert code == 0, finished_trio.peers[name].describe()
        assert seconds < 10, f"{name} took {seconds:.1f}s to stop"
        checkpoint = Path(finished_trio.peers[name].state_dir) / "checkpoint.pt"
        assert checkpoint.exists()
        assert "left the run" in finished_trio.peers["a"].log() or name == "a"


def test_python_m_daemon_is_locod() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "locod", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "start" in out.stdout and "status" in out.stdout and "simulate" in out.stdout
