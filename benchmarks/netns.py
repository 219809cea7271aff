"""A private network namespace whose loopback can be rate-limited, for benchmarks.

Everything stays on this machine: the namespace has only its own ``lo``; ``tc qdisc ...
tbf`` on that ``lo`` caps the traffic of every process inside it together, so three
daemons in one namespace share one link of the given rate. Needs root (or CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


class NamespaceError(RuntimeError):
    """The namespace could not be made (not root, no iproute2, ...)."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise NamespaceError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@contextlib.contextmanager
def namespace(name: str, rate_mbit: float | None) -> Iterator[list[str]]:
    """Yield the command prefix that runs a program inside a fresh, rate-limited namespace."""
    _ip("netns", "add", name)
    try:
        # An internet-like MTU: loopback's default 64 KiB packets would exceed a small
        # token bucket and never pass.
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "mtu", "1500", "up")
        if rate_mbit:
            # A burst of ~10 ms of traffic, and never less than many full packets.
            burst = max(32_000, int(rate_mbit * 1e6 / 8 / 100))
            result = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    name,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "lo",
                    "root",
                    "tbf",
                    "rate",
                    f"{rate_mbit}mbit",
                    "burst",
                    str(burst),
                    "latency",
                    "200ms",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode:
                raise NamespaceError(f"tc: {result.stderr.strip()}")
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def lo_tx_bytes() -> int:
    """Bytes sent on this namespace's loopback so far."""
    return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())


def check_available() -> None:
    if os.geteuid() != 0:
        raise NamespaceError("network namespaces need root; run the benchmark as root")
    name = f"locod-probe-{os.getpid()}"
    with namespace(name, None):
        pass
