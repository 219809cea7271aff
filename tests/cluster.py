"""Real ``locod start`` processes on loopback, for multi-peer tests.

Every wait polls a condition with a deadline (the daemons' own status service, their
state-dir files); nothing sleeps and hopes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locod.daemon.status import StatusUnavailable, query_status

ROOT = Path(__file__).resolve().parent.parent
LOCOD = [sys.executable, "-m", "locod"]

TINY_RUN = [
    "--model",
    "tiny",
    "--batch-size",
    "4",
    "--seq-len",
    "64",
    "--inner-steps",
    "8",
    "--warmup-steps",
    "10",
    "--lr",
    "2e-3",
    "--listen",
    "127.0.0.1:0",
    "--dht-listen",
    "/ip4/127.0.0.1/tcp/0",
    "--no-live",
    "--data",
    str(ROOT / "peer"),
    "--data",
    str(ROOT / "daemon"),
    "--matchmaking-window",
    "15",
    "--eval-batches",
    "2",
    "--log-level",
    "debug",
]


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.3
) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (StatusUnavailable, OSError, ValueError, KeyError) as error:
            last_error = error
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s:.0f}s waiting for {what}"
        + (f" (last error: {last_error})" if last_error else "")
    )


@dataclass
class Peer:
    name: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def info(self) -> dict[str, Any]:
        return dict(json.loads((self.state_dir / "daemon.json").read_text()))

    def address(self) -> str:
        return str(self.info()["listen"])

    def status(self) -> dict[str, Any]:
        return query_status(self.address(), timeout_s=5.0)

    def log(self) -> str:
        path = self.state_dir / "locod.log"
        return path.read_text() if path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = 15.0) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code, seconds it took)."""
        began = time.monotonic()
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None, time.monotonic() - began
        return code, time.monotonic() - began

    def describe(self) -> str:
        tail = self.stderr.read_text()[-3000:] if self.stderr.exists() else ""
        return (
            f"--- {self.name} (rc={self.process.poll()}) stderr tail:\n{tail}\n"
            f"--- {self.name} log tail:\n{self.log()[-3000:]}"
        )


@dataclass
class Cluster:
    root: Path
    common: list[str] = field(default_factory=lambda: list(TINY_RUN))
    peers: dict[str, Peer] = field(default_factory=dict)
    join_addr: str = ""
    prefixes: dict[str, list[str]] = field(default_factory=dict)
    """A command prefix per peer name (``ip netns exec NS`` for benchmarks' sites)."""
    peer_args: dict[str, list[str]] = field(default_factory=dict)
    """Flags per peer name, after the common ones (a site's own listen addresses)."""
    launchers: dict[str, list[str]] = field(default_factory=dict)
    """What runs ``start`` per peer name instead of ``python -m locod`` (torchrun ...)."""

    def start(self, name: str, *extra: str, join: bool = True, fresh: bool = True) -> Peer:
        state_dir = self.root / name
        if fresh and state_dir.exists():
            raise AssertionError(f"{state_dir} already exists")
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "daemon.json").unlink(missing_ok=True)
        args = [
            *self.prefixes.get(name, []),
            *self.launchers.get(name, LOCOD),
            "start",
            *self.common,
            *self.peer_args.get(name, []),
            "--state-dir",
            str(state_dir),
            "--cache-dir",
            str(self.root / "cache"),
            *extra,
        ]
        if join and self.join_addr:
            args += ["--join", self.join_addr]
        stdout = self.root / f"{name}.{len(self.peers)}.out"
        stderr = self.root / f"{name}.{len(self.peers)}.err"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            stdout=stdout.open("wb"),
            stderr=stderr.open("wb"),
            env=env,
            start_new_session=True,
        )
        peer = Peer(name, state_dir, process, stdout, stderr)
        self.peers[name] = peer
        if not self.join_addr:
            line = wait_for(lambda: self._join_line(peer), 90, f"{name} to print JOIN")
            self.join_addr = line.split("--join ", 1)[1].split()[0]
        wait_for(
            lambda: peer.alive() and (state_dir / "daemon.json").exists(), 90, f"{name} to serve"
        )
        return peer

    @staticmethod
    def _join_line(peer: Peer) -> str | None:
        if not peer.alive():
            raise AssertionError(peer.describe())
        for line in peer.stdout.read_text().splitlines():
            if "JOIN " in line:  # torchrun may prefix a rank's lines
                return line[line.index("JOIN ") :]
        return None

    def statuses(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        return {n: self.peers[n].status() for n in (names or list(self.peers))}

    def wait_all(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        what: str,
        names: list[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        names = names or [n for n, p in self.peers.items() if p.alive()]

        def check() -> dict[str, dict[str, Any]] | None:
            for name in names:
                if not self.peers[name].alive():
                    raise AssertionError(f"{name} died:\n{self.peers[name].describe()}")
            statuses = self.statuses(names)
            return statuses if all(predicate(s) for s in statuses.values()) else None

        try:
            return wait_for(check, timeout_s, what, interval_s=0.5)
        except AssertionError as error:
            details = "\n".join(self.peers[n].describe() for n in names)
            raise AssertionError(f"{error}\n{details}") from None

    def stop_all(self) -> None:
        for peer in self.peers.values():
            if peer.alive():
                peer.stop()
            # Whatever the daemon left behind (its DHT process, p2pd) goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(peer.process.pid, signal.SIGKILL)


def hashes(status: dict[str, Any]) -> dict[int, tuple[int, str]]:
    """fragment → (last round, global hash)."""
    return {f["index"]: (f["round"], f["global_hash"]) for f in status["fragments"]}
