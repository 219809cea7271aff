"""The library API: a user's own model and loop, two sites on loopback (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import hashes, wait_for

from locod.daemon.status import query_status

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_model.py"


def _start(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / f"{name}.out"
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--state-dir", str(tmp_path / name), *args],
        cwd=ROOT,
        stdout=out.open("wb"),
        stderr=(tmp_path / f"{name}.err").open("wb"),
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        start_new_session=True,
    )
    return process, out


def _line(process: subprocess.Popen[bytes], out: Path, tag: str) -> str | None:
    if process.poll() is not None:
        errors = out.with_suffix(".err").read_text()[-3000:]
        raise AssertionError(f"{out} exited {process.returncode}:\n{errors}")
    for line in out.read_text().splitlines():
        if line.startswith(tag + " "):
            return line.split(" ", 1)[1]
    return None


@pytest.mark.slow
def test_two_sites_of_the_api_example_agree_on_theta_g(tmp_path: Path) -> None:
    founder, founder_out = _start(tmp_path, "a", "--min-peers", "2", "--steps", "120", "--linger")
    processes = [founder]
    try:
        address = wait_for(lambda: _line(founder, founder_out, "ADDRESS"), 90, "the founder")
        joiner, joiner_out = _start(tmp_path, "b", "--join", address, "--steps", "120", "--linger")
        processes.append(joiner)
        joiner_address = wait_for(lambda: _line(joiner, joiner_out, "ADDRESS"), 90, "the joiner")
        for process, out in ((founder, founder_out), (joiner, joiner_out)):
            wait_for(lambda p=process, o=out: _line(p, o, "FINISHED"), 300, f"{out} to finish")
        statuses = [query_status(a) for a in (address, joiner_address)]
        assert all(s["state"] == "finished" for s in statuses)
        assert hashes(statuses[0]) == hashes(statuses[1]), "θ_g differs between the sites"
        for status in statuses:
            assert status["rounds_applied"] >= 12, status["rounds_applied"]
            assert any(r["group_size"] == 2 for r in status["rounds"]), "never a group of 2"
            assert len(status["peers"]) == 2
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
