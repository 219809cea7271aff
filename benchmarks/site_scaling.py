"""Site scaling: tokens/s of one site with 1 and 2 ranks, and what its syncs cost inside.

Each configuration runs ``locod start`` alone (one site, rounds of a group of one, so
every sync goes through the whole outer loop) for a fixed number of steps with the same
per-rank batch, and reads what rank 0 logs at the end: tokens trained per second from the
first step to the last, the time the training thread spent in the outer loop (send,
apply, merge) and the part of it spent in the intra-site collectives (the all-gathers of
FSDP2 shards and the broadcasts or scatters of the merged fragments).

    python -m benchmarks.site_scaling            # CPU ranks (gloo), writes docs/benchmarks.md
    python -m benchmarks.site_scaling --device cuda --no-write   # on a machine with GPUs
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
_SUMMARY = re.compile(
    r"outer loop: ([\d.]+)s over (\d+) steps in sends, applies and merges"
    r"(?:; ([\d.]+)s of it intra-site collectives)?; trained (\d+) tokens in ([\d.]+)s"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    model: str
    ranks: int
    parallel: str
    tokens_per_s: float
    outer_s: float
    collective_s: float
    train_s: float
    wall_s: float


def run_site(model: str, ranks: int, parallel: str, steps: int, device: str, root: Path) -> Outcome:
    """One site alone to ``steps``; its summary line parsed."""
    state = root / f"{model}-{ranks}-{parallel}"
    args = [
        sys.executable,
        "-m",
        "locod",
        "start",
        "--model",
        model,
        "--batch-size",
        "4",
        "--seq-len",
        "128",
        "--inner-steps",
        "10",
        "--warmup-steps",
        "10",
        "--max-steps",
        str(steps),
        "--eval-every",
        "0",
        "--device",
        device,
        "--parallel",
        parallel,
        "--nproc-per-node",
        str(ranks),
        "--listen",
        "127.0.0.1:0",
        "--dht-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-live",
        "--state-dir",
        str(state),
        "--cache-dir",
        str(root / "cache"),
    ]
    began = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - began
    log = (state / "locod.log").read_text() if (state / "locod.log").exists() else ""
    found = _SUMMARY.search(log)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"{model} × {ranks} ({parallel}) failed:\n{out.stderr[-3000:]}")
    outer_s, _, collective_s, tokens, train_s = found.groups()
    return Outcome(
        model=model,
        ranks=ranks,
        parallel=parallel,
        tokens_per_s=int(tokens) / float(train_s),
        outer_s=float(outer_s),
        collective_s=float(collective_s or 0.0),
        train_s=float(train_s),
        wall_s=wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs")
    options = parser.parse_args()
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as scratch:
        for model in options.models:
            for ranks, parallel in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
                outcome = run_site(
                    model, ranks, parallel, options.steps, options.device, Path(scratch)
                )
                outcomes.append(outcome)
                print(outcome, flush=True)
    rows = []
    for o in outcomes:
        single = next(x for x in outcomes if x.model == o.model and x.ranks == 1)
        rows.append(
            [
                o.model,
                o.ranks,
                o.parallel.upper() if o.ranks > 1 else "—",
                f"{o.tokens_per_s:,.0f}",
                f"{o.tokens_per_s / single.tokens_per_s:.2f}x",
                f"{100 * o.outer_s / o.train_s:.1f}%",
                f"{100 * o.collective_s / o.outer_s:.1f}%" if o.ranks > 1 and o.outer_s else "—",
                f"{o.wall_s:.0f}",
            ]
        )
    table = markdown_table(
        [
            "model",
            "ranks",
            "parallel",
            "tokens/s (site)",
            "vs 1 rank",
            "outer loop / training time",
            "intra-site collectives / outer loop",
            "wall s (with start-up)",
        ],
        rows,
    )
    body = (
        f"One site alone, `--device {options.device}`, {options.steps} steps of 4 × 128 tokens "
        "per rank, H = 10 (rounds of a group of one, so every sync runs the whole outer "
        "loop), each rank on one thread. 'tokens/s' is the site's (all ranks), from its "
        "first step to its last; 'outer loop' is the training thread's time in sends, "
        "applies and merges, including the intra-site collectives (FSDP2's all-gathers of "
        "the fragments due, and the broadcast or scatter of the merged fragments).\n\n" + table
    )
    print(body)
    if not options.no_write:
        write_section("site_scaling", "Site scaling: ranks of one site", body)


if __name__ == "__main__":
    main()
