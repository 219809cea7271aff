"""A private run: every RPC proves the run key; a call without it is refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster import Cluster

from locod.daemon.auth import sign, verify
from locod.daemon.status import StatusUnavailable, query_status


def test_hmac_header_round_trip_and_refusals() -> None:
    header = sign("sesame", "/locod.v1.Peer/Ping", "peer-a", 1000.0)
    assert verify("sesame", "/locod.v1.Peer/Ping", header, now=1001.0) is None
    assert verify("other", "/locod.v1.Peer/Ping", header, now=1001.0) == "wrong run key"
    # The proof is bound to the method: it cannot be replayed on another one.
    assert verify("sesame", "/locod.v1.Peer/Leave", header, now=1001.0) == "wrong run key"
    assert "off this peer's clock" in (
        verify("sesame", "/locod.v1.Peer/Ping", header, now=2000.0) or ""
    )
    assert verify("sesame", "/x", "garbage", now=0.0) == "malformed auth header"


@pytest.mark.slow
def test_a_private_daemon_refuses_calls_without_the_key(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        peer = cluster.start("private", "--key", "sesame", "--eval-every", "0")
        address = peer.address()
        with pytest.raises(StatusUnavailable, match="carries no proof of the run key"):
            query_status(address)
        with pytest.raises(StatusUnavailable, match="wrong run key"):
            query_status(address, key="guess")
        status = query_status(address, key="sesame")
        assert status["peer_id"]
        # A joiner with the wrong key cannot take the run's state.
        intruder = cluster.start("intruder", "--key", "guess")
        assert intruder.process.wait(120) != 0
        assert "UNAUTHENTICATED" in intruder.stderr.read_text()
    finally:
        cluster.stop_all()
