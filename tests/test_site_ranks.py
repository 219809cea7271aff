"""A site of many ranks (torchrun; gloo on CPU) is one peer of the run (issue 10).

* a 2-rank DDP site matches a 1-rank site that trains on the same rows as one 2× batch,
  and FSDP2 on 2 ranks matches DDP;
* a 2-rank site and a 1-rank site share one run: θ_g agrees, and the 2-rank site's
  tokens are the sum of its ranks';
* a rank killed mid-run takes the site down and torchrun restarts it from its checkpoint
  while the other site trains on;
* a site resumes its checkpoint with another number of ranks.

Each multi-process test costs tens of seconds (torchrun and one DHT per site): they share
runs where they can.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cluster import ROOT, Cluster, hashes

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# Exact arithmetic where it can be: plain SGD (no momentum, decay or clipping) and the fp32
# wire, so that the runs below differ only by the order of fp32 sums (DDP averages two
# 2-row means; one rank takes the mean of 4 rows; FSDP2 reduce-scatters).
EXACT = [
    "--model",
    "tiny",
    "--seq-len",
    "32",
    "--inner-steps",
    "4",
    "--inner-optimizer",
    "sgd",
    "--lr",
    "0.05",
    "--warmup-steps",
    "0",
    "--weight-decay",
    "0",
    "--grad-clip",
    "0",
    "--wire",
    "fp32",
    "--data-seed",
    "7",
    "--max-steps",
    "12",
    "--eval-every",
    "0",
    "--listen",
    "127.0.0.1:0",
    "--dht-listen",
    "/ip4/127.0.0.1/tcp/0",
    "--no-live",
    "--data",
    str(ROOT / "peer"),
]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _run_alone(state_dir: Path, cache: Path, *extra: str) -> dict[str, Any]:
    """One site alone to --max-steps; returns its checkpoint."""
    args = [sys.executable, "-m", "locod", "start", *EXACT, *extra]
    args += ["--state-dir", str(state_dir), "--cache-dir", str(cache)]
    out = subprocess.run(
        args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    log = (state_dir / "locod.log").read_text() if (state_dir / "locod.log").exists() else ""
    assert out.returncode == 0, f"{out.stderr[-4000:]}\n--- log\n{log[-3000:]}"
    checkpoint = torch.load(state_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    return dict(checkpoint)


def _assert_same_outer_state(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    for x, y in zip(a["outer"]["global_params"], b["outer"]["global_params"], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_ddp_ranks_match_one_rank_with_their_rows_fsdp_matches_and_resume_any_ranks(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    ddp = _run_alone(tmp_path / "ddp", cache, "--nproc-per-node", "2", "--batch-size", "2")
    one = _run_alone(tmp_path / "one", cache, "--batch-size", "4")
    fsdp = _run_alone(
        tmp_path / "fsdp",
        cache,
        "--nproc-per-node",
        "2",
        "--batch-size",
        "2",
        "--parallel",
        "fsdp",
    )
    assert ddp["step"] == one["step"] == fsdp["step"] == 12
    # The site's tokens are its ranks' together: 2 ranks × 2 rows = 1 rank × 4 rows.
    assert ddp["tokens"] == one["tokens"] == fsdp["tokens"] == 12 * 4 * 32
    # 12 SGD steps at lr 0.05 on parameters of order 0.02-1: reordered fp32 sums of a few
    # hundred terms differ by ~1e-7 relative per step; 1e-5 leaves two orders of margin.
    _assert_same_outer_state(ddp, one, atol=1e-5)
    _assert_same_outer_state(fsdp, ddp, atol=1e-5)
    # The outer momentum is the run's, once, whatever the number of ranks.
    assert len(ddp["outer"]["momentum"]) == len(one["outer"]["momentum"])

    # The 2-rank DDP site's checkpoint resumes on one rank (and FSDP2's on one as well).
    resumed = _run_alone(tmp_path / "ddp", cache, "--batch-size", "2", "--max-steps", "20")
    assert "resumed from the checkpoint at step 12" in (tmp_path / "ddp" / "locod.log").read_text()
    assert resumed["step"] == 20
    assert resumed["tokens"] == 12 * 2 * 2 * 32 + 8 * 2 * 32  # 12 steps of 2 ranks, 8 of one


def test_a_two_rank_site_and_a_one_rank_site_share_one_run(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    steps = 40
    common = ["--max-steps", str(steps), "--linger", "--eval-every", "0", "--min-peers", "2"]
    try:
        cluster.start("multi", *common, "--nproc-per-node", "2")
        cluster.start("single", *common)
        statuses = cluster.wait_all(lambda s: s["state"] == "finished", 300, "both sites")
        multi, single = statuses["multi"], statuses["single"]
        assert hashes(multi) == hashes(single), "θ_g differs between the sites"
        assert multi["rounds_applied"] >= 8 and single["rounds_applied"] >= 8
        assert any(r["group_size"] == 2 for r in multi["rounds"]), multi["rounds"]
        # One peer for the whole site, whose tokens are both ranks'.
        assert len(multi["peers"]) == len(single["peers"]) == 2
        batch, seq = 4, 64  # TINY_RUN's per-rank batch
        assert multi["tokens"] == steps * 2 * batch * seq
        rank1 = (cluster.peers["multi"].state_dir / "locod.rank1.log").read_text()
        assert "rank 1 of 2, DDP" in rank1
    finally:
        cluster.stop_all()


def test_a_killed_rank_restarts_its_site_from_the_checkpoint(tmp_path: Path) -> None:
    """Rank 1 of the joining site dies like SIGKILL at step 30; torchrun restarts the
    site's ranks, which resume the checkpoint and rejoin, while the founder trains on."""
    cluster = Cluster(tmp_path)
    cluster.launchers["multi"] = [
        *TORCHRUN,
        "--nproc-per-node=2",
        "--max-restarts=1",
        "-m",
        "locod",
    ]
    steps = 160
    common = [
        "--max-steps",
        str(steps),
        "--linger",
        "--eval-every",
        "0",
        "--fault",
        "slow-step:seconds=0.05",
        "--round-timeout",
        "8",
        "--chunk-timeout",
        "2",
    ]
    try:
        founder = cluster.start("founder", *common, "--min-peers", "2")
        multi = cluster.start(
            "multi",
            *common,
            "--checkpoint-every",
            "1",
            "--fault",
            "exit-at-step:step=30,rank=1",
        )
        statuses = cluster.wait_all(lambda s: s["state"] == "finished", 420, "both sites")
        log = multi.log()
        assert (
            "fault injected: rank 1 exits after step 30"
            in (multi.state_dir / "locod.rank1.log").read_text()
        )
        assert "resumed from the checkpoint at step" in log, log[-3000:]
        assert founder.alive(), "the founder's run must go on"
        assert hashes(statuses["multi"]) == hashes(statuses["founder"])
        after = [r for r in statuses["multi"]["rounds"] if r["outcome"] == "applied"]
        assert after and after[-1]["group_size"] == 2, statuses["multi"]["rounds"]
    finally:
        cluster.stop_all()
