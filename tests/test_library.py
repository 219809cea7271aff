"""The library API: users' own models and loops, two sites on loopback (real processes).

* examples/own_model.py: a PyTorch module of the user's, its repeated layers given;
* examples/hf_model.py: a transformers Llama built from a local config, a BPE tokenizer
  trained here on a few files (offline), its blocks found; a joiner with another model
  config or another tokenizer is refused with a message naming the difference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import hashes, wait_for
from hf_helpers import llama_folder, train_tokenizer, write_text_files

from locod.daemon.status import query_status

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


class Sites:
    """Example processes started in a test, stopped at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, example: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        out = self.root / f"{name}.out"
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / example), "--state-dir", str(self.root / name), *args],
            cwd=ROOT,
            stdout=out.open("wb"),
            stderr=(self.root / f"{name}.err").open("wb"),
            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
            start_new_session=True,
        )
        self.processes.append(process)
        return process, out

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    started = Sites(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def _line(process: subprocess.Popen[bytes], out: Path, tag: str) -> str | None:
    if process.poll() is not None:
        errors = out.with_suffix(".err").read_text()[-3000:]
        raise AssertionError(f"{out} exited {process.returncode}:\n{errors}")
    for line in out.read_text().splitlines():
        if line.startswith(tag + " "):
            return line.split(" ", 1)[1]
    return None


def _two_sites_agree(sites: Sites, example: str, *args: str, steps: int = 120) -> None:
    common = [*args, "--steps", str(steps), "--linger"]
    founder, founder_out = sites.start("a", example, *common, "--min-peers", "2")
    address = wait_for(lambda: _line(founder, founder_out, "ADDRESS"), 120, "the founder")
    joiner, joiner_out = sites.start("b", example, *common, "--join", address)
    joiner_address = wait_for(lambda: _line(joiner, joiner_out, "ADDRESS"), 120, "the joiner")
    for process, out in ((founder, founder_out), (joiner, joiner_out)):
        wait_for(lambda p=process, o=out: _line(p, o, "FINISHED"), 400, f"{out} to finish")
    statuses = [query_status(a) for a in (address, joiner_address)]
    assert all(s["state"] == "finished" for s in statuses)
    assert hashes(statuses[0]) == hashes(statuses[1]), "θ_g differs between the sites"
    for status in statuses:
        assert status["rounds_applied"] >= 12, status["rounds_applied"]
        assert any(r["group_size"] == 2 for r in status["rounds"]), "never a group of 2"
        assert len(status["peers"]) == 2


def test_two_sites_of_the_own_model_example_agree_on_theta_g(sites: Sites) -> None:
    _two_sites_agree(sites, "own_model.py")


@pytest.fixture
def llama(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "texts"
    files = write_text_files(data)
    tokenizer = train_tokenizer(files, tmp_path / "tokenizer.json")
    other_tokenizer = train_tokenizer(files, tmp_path / "other" / "tokenizer.json", 280)
    return {
        "data": data,
        "tokenizer": tokenizer,
        "other_tokenizer": other_tokenizer,
        "model": llama_folder(tmp_path / "llama", vocab_size=300),
        "wider": llama_folder(tmp_path / "wider", vocab_size=300, hidden_size=48),
    }


def test_two_sites_of_the_hf_example_agree_and_strangers_are_refused(
    sites: Sites, llama: dict[str, Path]
) -> None:
    def args(model: str = "model", tokenizer: str = "tokenizer") -> list[str]:
        return [
            "--model-dir",
            str(llama[model]),
            "--tokenizer",
            str(llama[tokenizer]),
            "--data",
            str(llama["data"]),
        ]

    _two_sites_agree(sites, "hf_model.py", *args())
    founder_address = _line(sites.processes[0], sites.root / "a.out", "ADDRESS")
    assert founder_address is not None
    for name, bad, expected in (
        ("wider", args(model="wider"), "model hidden_size: this peer has 48, the run has 32"),
        ("tokenized", args(tokenizer="other_tokenizer"), "tokenizer: this peer's is"),
    ):
        process, _ = sites.start(name, "hf_model.py", *bad, "--join", founder_address)
        assert process.wait(180) != 0
        errors = (sites.root / f"{name}.err").read_text()
        assert expected in errors, errors[-3000:]
        assert "contradict the run's config" in errors


def test_the_own_model_example_under_torchrun_is_one_site_of_two_ranks(tmp_path: Path) -> None:
    """The user's own DDP loop, two ranks, locod.found and streaming_diloco on each."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(EXAMPLES / "own_model.py"),
            "--state-dir",
            str(tmp_path / "site"),
            "--steps",
            "30",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    finished = [line for line in out.stdout.splitlines() if "FINISHED" in line]
    assert len(finished) == 1, out.stdout  # rank 0 speaks for the site
    # Both ranks' tokens: 30 steps × 2 ranks × 8 windows × 64 tokens.
    assert finished[0].endswith(f"step 30 tokens {30 * 2 * 8 * 64}"), finished
