"""``--join HOST:PORT``: find a run's DHT through one of its peers' gRPC address.

A DHT multiaddr (``/ip4/.../tcp/.../p2p/...``) is long and changes when a peer restarts
with a new DHT identity; a gRPC address is what people remember and put in compose files.
The daemon must not create any gRPC object before the DHT process is forked, so the lookup
runs in a short-lived subprocess (``python -m locod.daemon.resolve HOST:PORT``) that asks the
peer's ``Ping`` for its DHT multiaddrs.
"""

from __future__ import annotations

import json
import subprocess
import sys


class ResolveError(Exception):
    """No DHT address could be learnt from a ``--join`` value."""


def is_multiaddr(text: str) -> bool:
    return text.startswith("/")


def resolve_joins(joins: tuple[str, ...] | list[str], timeout_s: float) -> list[str]:
    """Multiaddrs for every ``--join`` value (multiaddrs pass through unchanged)."""
    result: list[str] = []
    for value in joins:
        if is_multiaddr(value):
            result.append(value)
            continue
        try:
            out = subprocess.run(
                [sys.executable, "-m", "locod.daemon.resolve", value, str(timeout_s)],
                capture_output=True,
                text=True,
                timeout=timeout_s + 30,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ResolveError(f"--join {value}: no answer within {timeout_s:.0f}s") from None
        if out.returncode != 0:
            raise ResolveError(f"--join {value}: {out.stderr.strip() or 'lookup failed'}")
        result.extend(json.loads(out.stdout))
    return result


def _lookup(address: str, timeout_s: float) -> list[str]:
    import grpc

    from locod.daemon.rpc import peer_pb2, peer_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        try:
            reply = stub.Ping(peer_pb2.PingRequest(sender="resolve"), timeout=timeout_s)
        except grpc.RpcError as error:
            raise ResolveError(
                f"cannot reach a locod peer at {address}: {error.code().name}"
            ) from None
    if not reply.dht_addrs:
        raise ResolveError(f"the peer at {address} reported no DHT address")
    public = [a for a in reply.dht_addrs if "/127.0.0.1/" not in a]
    host = address.rpartition(":")[0]
    # Prefer the DHT address on the host we reached the peer by.
    preferred = [a for a in reply.dht_addrs if f"/{host}/" in a]
    return preferred or public or list(reply.dht_addrs)


def main() -> int:
    address = sys.argv[1]
    timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    try:
        print(json.dumps(_lookup(address, timeout_s)))
    except ResolveError as error:
        print(str(error), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
