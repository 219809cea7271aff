"""Quality: data-parallel vs DiLoCo vs Streaming DiLoCo at equal tokens (issue 2).

    python -m benchmarks.quality [--quick] [--steps N] [--model tiny] [--inner-steps H] ...

Why: Streaming DiLoCo only earns its 400x fewer bytes if it trains as well as
data-parallel on the same data. The papers show it does for their models (Streaming
DiLoCo Table 5: within about 1% of data-parallel at 35M-1B parameters, M = 2). This
benchmark repeats that comparison on the in-process simulator (``peer.simulator``),
which runs the same algorithm code and the real codec as the daemon, so what it measures
is what a run of ``locod`` would train, minus the network's timing.

For each M (default 2 and 4) it runs three methods from the same initial weights with the
same inner settings (AdamW, lr, warmup, cosine decay to the last step, seq_len, seed) and
the same *global* batch, so every run sees the same number of tokens per step and in
total (each of M peers trains on ``batch / M`` sequences per step, as the paper's
fixed-token-budget comparison of M = 2 and M = 4 does):

* ``ddp`` — gradients averaged every step in fp32 (one model stands for all M);
* ``diloco`` — P = 1, τ = 0, α = 0, fp32 wire, outer Nesterov lr 0.7 (DiLoCo's paper);
* ``streaming`` — P fragments (auto: the embeddings' and one per ~3 blocks), FP4 wire with
  zstd, τ = 1, α = 0.5, outer Nesterov lr 0.4 (Streaming DiLoCo's paper and our default).

Each method keeps its own paper's outer lr, so neither is tuned to this benchmark; the
report's analysis shows what the other choice gives (``--outer-lr``, ``--diloco-outer-lr``).

It reports the held-out loss of the outer parameters θ_g (what the papers evaluate), the
paper's Table 3 columns (the replicas' own mean loss and the loss of their average),
bytes each peer sent, and each method's loss relative to ddp at the same M. Every run
evaluates on the same held-out sequences.

The default setting is sized to finish in under 20 minutes on a 2-core CPU: the ``tiny``
preset (0.25M parameters) for 1000 steps of 32 x 128 bytes (4.1M tokens, 17 per parameter,
close to Chinchilla's compute-optimal 20), H = 30 (a column of the paper's Table 5). One
such run takes 2-2.5 minutes on a quiet 2-core machine (M = 4 a little more), so the six
take about 15 minutes; the ``small`` preset (20x the parameters) would take about 10x as
long. The machine's speed varies with what else runs on it: read the wall-time column.
``--quick`` is a ~2-minute smoke check that prints its table but does not write the report.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.report import markdown_table, write_section
from locod.peer.codec import WireFormat
from locod.peer.config import OuterConfig
from locod.peer.data import Corpus, load_corpus
from locod.peer.inner import InnerConfig
from locod.peer.model import model_config
from locod.peer.quantize import CODECS
from locod.peer.simulator import SimulationConfig, SimulationResult, simulate

METHODS = ("ddp", "diloco", "streaming")
WIRE_NAMES = {
    "fp4": "FP4 E3M0 (block 64)",
    "int8": "int8 (block 64)",
    "bf16": "bf16",
    "fp32": "fp32",
}


@dataclass(frozen=True, slots=True)
class Setting:
    """Everything the runs share; one object so the table and its caption cannot disagree."""

    model: str
    steps: int
    batch: int
    """Global sequences per step, split evenly over the M peers."""
    seq_len: int
    lr: float
    warmup: int
    inner_steps: int
    outer_lr: float
    diloco_outer_lr: float
    alpha: float
    overlap: int
    wire: str
    """Streaming's codec (zstd 3 after it); DiLoCo and ddp send fp32."""
    fragments: int
    """Streaming's P; 0 picks the default (the embeddings' and one per ~3 blocks)."""
    eval_seqs: int
    seed: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description="Held-out loss of ddp, DiLoCo and Streaming DiLoCo at equal tokens.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="~2-minute smoke check (200 steps, batch 16, H 20); "
        "prints the table, does not write docs/benchmarks.md",
    )
    parser.add_argument("--model", default="tiny", help="model preset (default: tiny)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="inner steps per run (default 1000; 200 with --quick)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global sequences per step, split over the M peers (default 32; 16 with --quick)",
    )
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak inner AdamW lr")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warmup steps (default: steps / 12); cosine decay to the last step",
    )
    parser.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="H, inner steps per sync (default 30; 20 with --quick)",
    )
    parser.add_argument(
        "--outer-lr", type=float, default=0.4, help="streaming's outer lr (0.4, its paper's)"
    )
    parser.add_argument(
        "--diloco-outer-lr",
        type=float,
        default=0.7,
        help="DiLoCo's outer lr (0.7, its paper's; Streaming DiLoCo's is 0.4)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="streaming's merge α")
    parser.add_argument("--overlap", type=int, default=1, help="streaming's τ")
    parser.add_argument(
        "--wire", choices=CODECS, default="fp4", help="streaming's codec (default fp4)"
    )
    parser.add_argument("--fragments", type=int, default=0, help="streaming's P (default 0: auto)")
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="values of M")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--eval-seqs",
        type=int,
        default=512,
        help="held-out sequences per evaluation (same ones for every run)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = 200 if args.quick else 1000
    if args.batch is None:
        args.batch = 16 if args.quick else 32
    if args.inner_steps is None:
        args.inner_steps = 20 if args.quick else 30
    if args.warmup is None:
        args.warmup = max(1, args.steps // 12)
    for m in args.peers:
        if m < 1 or args.batch % m or args.eval_seqs % (args.batch // m):
            parser.error(
                f"--batch {args.batch} must split evenly over M = {m} peers, and --eval-seqs "
                f"{args.eval_seqs} must be a multiple of the per-peer batch"
            )
    model_config(args.model)
    return args


def run_config(setting: Setting, method: str, peers: int) -> SimulationConfig:
    """The simulator's config for one (method, M) cell: only the outer loop differs."""
    per_peer = setting.batch // peers
    inner = InnerConfig(
        lr=setting.lr,
        warmup_steps=setting.warmup,
        decay_steps=setting.steps,
        batch_size=per_peer,
        seq_len=setting.seq_len,
    )
    if method == "ddp":
        outer = OuterConfig(wire=WireFormat(codec="fp32", zstd_level=0))
    elif method == "diloco":
        # P = 1, τ = 0, α = 0 are forced by the simulator for "diloco"; say them anyway.
        outer = OuterConfig(
            inner_steps=setting.inner_steps,
            fragments=1,
            overlap=0,
            alpha=0.0,
            outer_lr=setting.diloco_outer_lr,
            wire=WireFormat(codec="fp32", zstd_level=0),
        )
    else:
        outer = OuterConfig(
            inner_steps=setting.inner_steps,
            fragments=setting.fragments,
            overlap=setting.overlap,
            alpha=setting.alpha,
            outer_lr=setting.outer_lr,
            wire=WireFormat(codec=setting.wire, zstd_level=3),
        )
    return SimulationConfig(
        method=method,
        peers=peers,
        steps=setting.steps,
        model=setting.model,
        seed=setting.seed,
        # heldout_batches spaces batch x num_batches windows evenly over the held-out split,
        # so a fixed product gives every run (whatever its per-peer batch) the same sequences.
        eval_batches=setting.eval_seqs // per_peer,
        inner=inner,
        outer=outer,
    )


def _fmt_loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fmt_bytes(value: float) -> str:
    if value == 0:
        return "0"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} B"


def describe(method: str, result: SimulationResult) -> str:
    if method == "ddp":
        return f"ddp ({result.wire})"
    return (
        f"{method} (P={result.fragments}, H={result.inner_steps}, τ={result.overlap}, "
        f"α={result.alpha:g}, {result.wire})"
    )


def tables(setting: Setting, results: dict[tuple[int, str], SimulationResult]) -> tuple[str, str]:
    """The main table and the eval-curve table, as markdown."""
    rows = []
    for (peers, method), result in results.items():
        ddp = results.get((peers, "ddp"))
        relative = (
            "—"
            if ddp is None or method == "ddp"
            else f"{100 * (result.eval_loss - ddp.eval_loss) / ddp.eval_loss:+.2f}%"
        )
        rows.append(
            [
                peers,
                describe(method, result),
                f"{result.eval_loss:.4f}",
                relative,
                _fmt_loss(result.eval_loss_replicas),
                _fmt_loss(result.eval_loss_replica_average),
                f"{result.train_loss:.4f}",
                _fmt_bytes(result.bytes_sent_per_peer),
                _fmt_bytes(result.peak_bytes_per_sync),
                result.rounds,
                f"{result.wall_s:.0f}",
            ]
        )
    main = markdown_table(
        [
            "M",
            "method",
            "eval loss (θ_g)",
            "vs ddp",
            "replicas' mean",
            "replicas averaged",
            "train loss (last step)",
            "bytes/peer",
            "peak/sync",
            "rounds",
            "wall s",
        ],
        rows,
    )
    checkpoints = sorted({step for r in results.values() for step, _ in r.eval_curve})
    curve_rows = []
    for (peers, method), result in results.items():
        at = dict(result.eval_curve)
        curve_rows.append(
            [peers, method] + [f"{at[s]:.4f}" if s in at else "" for s in checkpoints]
        )
    curve = markdown_table(["M", "method"] + [f"step {s}" for s in checkpoints], curve_rows)
    return main, curve


def caption(setting: Setting, corpus: Corpus, parameters: int) -> str:
    tokens = setting.steps * setting.tokens_per_step
    return (
        f"Model `{setting.model}` ({parameters:,} parameters), corpus: {corpus.description}. "
        f"Every run: {setting.steps} steps of {setting.batch} x {setting.seq_len} bytes "
        f"globally ({setting.batch} / M sequences per peer per step), "
        f"{tokens:,} training tokens ({tokens / parameters:.1f} per parameter); inner AdamW lr "
        f"{setting.lr:g}, warmup {setting.warmup}, cosine decay to 0.1 x lr at step "
        f"{setting.steps}, weight decay 0.1, clip 1.0; seed {setting.seed}. DiLoCo: P = 1, "
        f"τ = 0, α = 0, outer Nesterov lr {setting.diloco_outer_lr:g} (momentum 0.9), fp32 "
        f"wire. Streaming: {WIRE_NAMES[setting.wire]} + zstd 3, τ = {setting.overlap}, "
        f"α = {setting.alpha:g}, outer Nesterov lr {setting.outer_lr:g}. Eval loss is nats "
        f"per byte on the same {setting.eval_seqs} held-out sequences for every run, taken "
        f"with θ_g after a final sync of every fragment (for ddp, its one model); "
        f'"replicas\' mean" is the mean loss of the M replicas\' own θ, "replicas averaged" '
        f"the loss of their parameter average (paper Table 3). Bytes count each synchronized "
        f"tensor as (M−1)/M of the peer's encoded contribution plus (M−1)/M of the encoded "
        f"mean, as the simulator does."
    )


def _progress(peers: int, line: str) -> None:
    print(f"  M={peers} {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setting = Setting(
        model=args.model,
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        inner_steps=args.inner_steps,
        outer_lr=args.outer_lr,
        diloco_outer_lr=args.diloco_outer_lr,
        alpha=args.alpha,
        overlap=args.overlap,
        wire=args.wire,
        fragments=args.fragments,
        eval_seqs=args.eval_seqs,
        seed=args.seed,
    )
    corpus = load_corpus()
    started = time.perf_counter()
    results: dict[tuple[int, str], SimulationResult] = {}
    for peers in args.peers:
        for method in args.methods:
            cfg = run_config(setting, method, peers)
            result = simulate(cfg, corpus, progress=functools.partial(_progress, peers))
            results[(peers, method)] = result
            print(
                f"M={peers} {method}: eval {result.eval_loss:.4f} in {result.wall_s:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    total = time.perf_counter() - started
    main_table, curve_table = tables(setting, results)
    parameters = next(iter(results.values())).parameters
    body = (
        f"{caption(setting, corpus, parameters)}\n\n{main_table}\n\n"
        f"Held-out loss of θ_g during the runs (the last point is after the final sync):\n\n"
        f"{curve_table}\n\nTotal wall time: {total / 60:.1f} min."
    )
    print(body)
    if not (args.quick or args.no_write):
        write_section("quality", "Quality: ddp vs DiLoCo vs Streaming DiLoCo at equal tokens", body)


if __name__ == "__main__":
    main()
