"""Who is in the run: signed peer records and the run config in a hivemind DHT.

Only the DHT is hivemind's; the data path is ours (gRPC). Records:

* ``<run>/peers`` — one subkey per peer, owned by the peer's RSA key (hivemind's signature
  validator refuses writes by anybody else): its gRPC address, whether it is client-only,
  version, config hash, step, throughput, when it joined. Records expire unless refreshed,
  so a peer that dies silently drops out within ``record_ttl_s``.
* ``<run>/config`` — the run config (JSON) under each peer's own subkey; joiners adopt
  the one most peers publish.

The peer id is derived from the owner key, so nobody can publish a record in another peer's
name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECORD_TTL_S = 30.0


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """What a peer says about itself in the DHT."""

    peer_id: str
    address: str
    client_only: bool
    version: str
    config_hash: str
    step: int
    tokens_per_s: float
    joined_at: float
    left: bool = False
    ready: bool = False
    """Holds the run's state and can train (a newcomer is not ready while downloading)."""
    updated_at: float = 0.0


def load_or_create_key(path: Path) -> Any:
    """The peer's RSA identity, kept in the state dir so a restarted peer keeps its id."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    if path.exists():
        key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
        return key
    fresh = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_bytes(fresh.to_bytes())
    temp.chmod(0o600)
    temp.replace(path)
    return fresh


def peer_id_from_owner(owner: bytes) -> str:
    """A short, stable id derived from the owner marker of the peer's DHT subkey."""
    return hashlib.blake2b(owner, digest_size=8).hexdigest()


class Discovery:
    """Thin, typed wrapper over the DHT for one run. Blocking calls: use from a thread."""

    def __init__(self, dht: Any, run: str, owner: bytes) -> None:
        self.dht = dht
        self.run = run
        self.owner = owner
        self.peer_id = peer_id_from_owner(owner)

    def publish(self, record: PeerRecord, ttl_s: float = RECORD_TTL_S) -> bool:
        from hivemind.utils import get_dht_time

        now = get_dht_time()
        value = asdict(record) | {"updated_at": now}
        return bool(self.dht.store(f"{self.run}/peers", value, now + ttl_s, subkey=self.owner))

    def peers(self) -> list[PeerRecord]:
        """Live peers' records (including our own), oldest member first."""
        found = self.dht.get(f"{self.run}/peers", latest=True)
        records = []
        if found is None or not isinstance(found.value, dict):
            return []
        for owner, item in found.value.items():
            record = _parse_record(owner, getattr(item, "value", None))
            if record is not None and not record.left:
                records.append(record)
        return sorted(records, key=lambda r: (r.joined_at, r.peer_id))

    def publish_config(self, config: dict[str, Any], ttl_s: float = 3600.0) -> bool:
        from hivemind.utils import get_dht_time

        text = json.dumps(config, sort_keys=True)
        return bool(
            self.dht.store(f"{self.run}/config", text, get_dht_time() + ttl_s, subkey=self.owner)
        )

    def run_config(self) -> dict[str, Any] | None:
        """The run config most peers publish, or None if nobody has published one yet."""
        found = self.dht.get(f"{self.run}/config", latest=True)
        if found is None or not isinstance(found.value, dict):
            return None
        texts = [getattr(v, "value", None) for v in found.value.values()]
        counts = Counter(t for t in texts if isinstance(t, str))
        for text, _ in counts.most_common():
            try:
                parsed = json.loads(text)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                return parsed
        return None


def _parse_record(owner: Any, value: Any) -> PeerRecord | None:
    """A record from the DHT, or None if it is malformed or claims another peer's id."""
    if not isinstance(owner, bytes) or not isinstance(value, dict):
        return None
    try:
        record = PeerRecord(
            peer_id=str(value["peer_id"]),
            address=str(value["address"]),
            client_only=bool(value["client_only"]),
            version=str(value["version"]),
            config_hash=str(value["config_hash"]),
            step=int(value["step"]),
            tokens_per_s=float(value["tokens_per_s"]),
            joined_at=float(value["joined_at"]),
            left=bool(value.get("left", False)),
            ready=bool(value.get("ready", False)),
            updated_at=float(value.get("updated_at", 0.0)),
        )
    except (KeyError, TypeError, ValueError):
        return None
    if record.peer_id != peer_id_from_owner(owner):
        return None
    return record


def _die_with_parent() -> None:
    """In a forked child: get SIGKILL when the daemon dies, however it dies.

    hivemind's DHT process ignores SIGTERM and outlives a daemon killed with SIGKILL,
    keeping its ports; p2pd in turn dies with the DHT process.
    """
    import ctypes
    import signal as _signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(_signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@functools.cache
def _install_die_with_parent() -> None:
    """Once per process: every child forked from now on dies with this process."""
    if sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=_die_with_parent)


def start_dht(
    *,
    initial_peers: list[str],
    host_maddrs: list[str],
    key: Any,
    announce_maddrs: list[str] | None = None,
) -> tuple[Any, bytes]:
    """Start hivemind's DHT (its own process) with a signature validator for our key.

    Must run before any gRPC object is created in this process (gRPC and fork do not mix).
    Returns the DHT and this peer's owner marker (its protected subkey).
    """
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator

    _install_die_with_parent()

    validator = RSASignatureValidator(key)
    kwargs: dict[str, Any] = {}
    if announce_maddrs:
        kwargs["announce_maddrs"] = announce_maddrs
    dht = hivemind.DHT(
        initial_peers=initial_peers or None,
        host_maddrs=host_maddrs,
        start=True,
        record_validators=[validator],
        **kwargs,
    )
    return dht, validator.local_public_key
