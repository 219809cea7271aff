"""Private network namespaces with rate-limited links, for benchmarks.

Everything stays on this machine. Two shapes:

* :func:`namespace`: one namespace with only its own ``lo``; ``tc qdisc ... tbf`` on that
  ``lo`` caps the traffic of every process inside it together, so daemons in one
  namespace share one link of the given rate.
* :func:`star`: one namespace per site, each joined by a veth pair to a bridge in this
  namespace, with ``tbf`` on the site's side of its veth: every site has its own uplink
  of the given rate (its downlink is not limited), as sites on the internet do. This
  namespace reaches every site through the bridge.

Needs root (or CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAR_SUBNET = "10.77.0"


class NamespaceError(RuntimeError):
    """The namespace could not be made (not root, no iproute2, ...)."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise NamespaceError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _tbf(prefix: list[str], device: str, rate_mbit: float) -> None:
    """Cap what leaves ``device`` at ``rate_mbit``."""
    # A burst of ~10 ms of traffic, and never less than many full packets.
    burst = max(32_000, int(rate_mbit * 1e6 / 8 / 100))
    command = [*prefix, "tc", "qdisc", "add", "dev", device, "root", "tbf"]
    command += ["rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise NamespaceError(f"tc: {result.stderr.strip()}")


@dataclass(frozen=True)
class Site:
    """One site of a :func:`star`: how to run a program there, and its address."""

    prefix: list[str]
    ip: str


@contextlib.contextmanager
def star(names: list[str], uplink_mbit: float | None) -> Iterator[dict[str, Site]]:
    """One namespace per name, each with its own uplink capped at ``uplink_mbit``."""
    if len(names) > 250:
        raise NamespaceError("a star holds at most 250 sites")
    tag = f"{os.getpid() % 100000}"
    bridge = f"lcb{tag}"
    made: list[str] = []
    links: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{STAR_SUBNET}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        sites: dict[str, Site] = {}
        for index, name in enumerate(names, start=1):
            space, outer, inner = f"locod-{tag}-{index}", f"lc{tag}o{index}", f"lc{tag}i{index}"
            _ip("netns", "add", space)
            made.append(space)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            links.append(outer)
            _ip("link", "set", inner, "netns", space)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            prefix = ["ip", "netns", "exec", space]
            address = f"{STAR_SUBNET}.{index}"
            _ip("netns", "exec", space, "ip", "link", "set", "lo", "up")
            _ip("netns", "exec", space, "ip", "addr", "add", f"{address}/24", "dev", inner)
            _ip("netns", "exec", space, "ip", "link", "set", inner, "up")
            if uplink_mbit:
                _tbf(prefix, inner, uplink_mbit)
            sites[name] = Site(prefix, address)
        yield sites
    finally:
        # A namespace a process still holds outlives ``netns del``: delete the links too.
        for link in links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        for space in made:
            subprocess.run(["ip", "netns", "del", space], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


@contextlib.contextmanager
def namespace(name: str, rate_mbit: float | None) -> Iterator[list[str]]:
    """Yield the command prefix that runs a program inside a fresh, rate-limited namespace."""
    _ip("netns", "add", name)
    try:
        # An internet-like MTU: loopback's default 64 KiB packets would exceed a small
        # token bucket and never pass.
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "mtu", "1500", "up")
        if rate_mbit:
            _tbf(["ip", "netns", "exec", name], "lo", rate_mbit)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def run_inside(module: str, arguments: list[str], rate_mbit: float | None) -> dict[str, Any]:
    """Run ``python -m module --inside --json F *arguments`` in a fresh namespace whose
    ``lo`` is capped at ``rate_mbit``, and return the JSON object it wrote to F."""
    name = f"locod-{module.rsplit('.', 1)[-1]}-{os.getpid()}"
    with namespace(name, rate_mbit) as prefix, tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [*prefix, sys.executable, "-m", module, "--inside", "--json", out.name]
        subprocess.run([*command, *arguments], cwd=ROOT, check=True)
        return dict(json.loads(Path(out.name).read_text()))


def lo_tx_bytes() -> int:
    """Bytes sent on this namespace's loopback so far."""
    return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())


def check_available() -> None:
    if os.geteuid() != 0:
        raise NamespaceError("network namespaces need root; run the benchmark as root")
    name = f"locod-probe-{os.getpid()}"
    with namespace(name, None):
        pass
