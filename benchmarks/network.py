"""Three real daemons on one rate-limited link: bytes on the wire, and compute utilization.

``python -m benchmarks.network`` starts, for each link rate, a fresh network namespace
whose loopback is capped with ``tc qdisc ... tbf`` (all three peers share that one link),
runs a 3-peer ``locod start`` run inside it, and records per peer:

* bytes of payload the daemon counted, and bytes that really crossed the namespace's
  loopback (``/sys/class/net/lo/statistics/tx_bytes`` / 3: gRPC framing, HTTP/2, TCP/IP
  headers, DHT traffic, state download and status queries included);
* compute utilization, 1 − wait_fraction: the share of wall time training did not wait on
  the network.

It writes two sections of docs/benchmarks.md: the wire bytes next to what ``locod
simulate`` accounts for the same settings, and utilization per rate next to the rate
Streaming DiLoCo needs in theory (a fragment's traffic per peer over τ·step time).
Needs root for the namespaces.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the multi-process harness the tests use

PEERS = 3


def _run_settings(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--inner-steps",
        str(args.inner_steps),
        "--fragments",
        str(args.fragments),
        "--overlap",
        "1",
        "--max-steps",
        str(args.steps),
        "--linger",
        "--min-peers",
        str(PEERS),
        "--eval-every",
        "0",
        "--matchmaking-window",
        "20",
        "--round-timeout",
        "300",
        "--chunk-timeout",
        "120",
        "--late-wait",
        "300",
        "--listen",
        "127.0.0.1:0",
        "--dht-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-live",
    ]


def inside(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three peers (we are inside the namespace) and measure."""
    from cluster import Cluster  # type: ignore[import-not-found]

    from benchmarks.netns import lo_tx_bytes

    with tempfile.TemporaryDirectory(prefix="locod-bench-") as scratch:
        cluster = Cluster(Path(scratch), common=_run_settings(args))
        try:
            began_tx = lo_tx_bytes()
            for name in ("a", "b", "c"):
                cluster.start(name)
            statuses = cluster.wait_all(
                lambda s: s["state"] == "finished", args.timeout, "all peers to finish"
            )
            tx = lo_tx_bytes() - began_tx
        finally:
            cluster.stop_all()
    peers = list(statuses.values())
    return {
        "lo_bytes_per_peer": tx / PEERS,
        "payload_sent_per_peer": sum(s["bytes_sent"] for s in peers) / PEERS,
        "payload_received_per_peer": sum(s["bytes_received"] for s in peers) / PEERS,
        "state_sent_per_peer": sum(s["state_bytes_sent"] for s in peers) / PEERS,
        "utilization": [1.0 - s["wait_fraction"] for s in peers],
        "tokens_per_s": [s["tokens_per_s"] for s in peers],
        "waited_s": [s["waited_s"] for s in peers],
        "group_sizes": sorted({r["group_size"] for s in peers for r in s["rounds"]}),
        "rounds": [s["rounds_applied"] for s in peers],
        "failed": [s["rounds_failed"] + s["rounds_skipped"] for s in peers],
        "hashes_equal": len(
            {
                json.dumps(s["fragments"] and [f["global_hash"] for f in s["fragments"]])
                for s in peers
            }
        )
        == 1,
    }


def simulated_bytes(args: argparse.Namespace) -> tuple[float, float, int]:
    """What ``locod simulate`` accounts per peer for the same settings (no final flush)."""
    from locod.peer.codec import WireFormat
    from locod.peer.config import OuterConfig
    from locod.peer.data import load_corpus
    from locod.peer.inner import InnerConfig
    from locod.peer.simulator import SimulationConfig, simulate

    cfg = SimulationConfig(
        method="streaming",
        peers=PEERS,
        steps=args.steps,
        model=args.model,
        final_sync=False,
        eval_batches=1,
        inner=InnerConfig(batch_size=args.batch_size, seq_len=args.seq_len),
        outer=OuterConfig(
            inner_steps=args.inner_steps, fragments=args.fragments, overlap=1, wire=WireFormat()
        ),
    )
    result = simulate(cfg, load_corpus())
    return result.bytes_sent_per_peer, result.peak_bytes_per_sync, result.rounds


def theory_mbit(args: argparse.Namespace, step_s: float) -> float:
    """Rate one peer needs so a fragment's round fits in τ = 1 step: the largest
    fragment's traffic per peer (2(M−1)/M × its FP4+zstd size) over the step time."""
    import torch

    from locod.peer.codec import WireFormat, encode
    from locod.peer.fragments import partition
    from locod.peer.model import build_model, model_config

    model = build_model(model_config(args.model), seed=0)
    fragments = partition(model, list(model.blocks), args.fragments)
    largest = max(f.numel for f in fragments)
    # Outer gradients look like small Gaussian noise; the size depends little on the values.
    size = len(encode(torch.randn(largest) * 1e-3, WireFormat()))
    per_peer = 2 * (PEERS - 1) / PEERS * size
    return per_peer * 8 / step_s / 1e6


def outside(args: argparse.Namespace) -> None:
    from benchmarks.netns import NamespaceError, check_available, run_inside
    from benchmarks.report import markdown_table, write_section

    try:
        check_available()
    except NamespaceError as error:
        raise SystemExit(f"cannot run: {error}") from None
    rates = [float(r) for r in args.rates.split(",")]
    results: dict[float, dict[str, Any]] = {}
    for rate in rates:
        label = f"{rate:g} Mbit/s" if rate else "unlimited"
        print(f"== {label}", flush=True)
        began = time.monotonic()
        results[rate] = run_inside("benchmarks.network", _passthrough(args), rate or None)
        results[rate]["wall_s"] = time.monotonic() - began
        print(json.dumps(results[rate]), flush=True)

    base = results[0.0] if 0.0 in results else results[max(results)]
    tokens_per_step = args.batch_size * args.seq_len
    step_s = tokens_per_step / (sum(base["tokens_per_s"]) / PEERS)
    need_per_peer = theory_mbit(args, step_s)
    sim_bytes, sim_peak, sim_rounds = simulated_bytes(args)
    setting = (
        f"{PEERS} peers, model `{args.model}`, batch {args.batch_size}×{args.seq_len}, "
        f"H={args.inner_steps}, P={args.fragments}, τ=1, FP4+zstd, {args.steps} steps"
    )

    rounds_sent = base["payload_sent_per_peer"] - base["state_sent_per_peer"]
    wire_rows = [
        [
            "`locod simulate` accounting (codec output × (M−1)/M, both ways)",
            f"{sim_bytes / 1e6:.2f}",
            "1.00",
        ],
        [
            "daemon: round payload it sent (all payload minus state served)",
            f"{rounds_sent / 1e6:.2f}",
            f"{rounds_sent / sim_bytes:.2f}",
        ],
        [
            "daemon: all payload it sent (rounds + state served to the joiners)",
            f"{base['payload_sent_per_peer'] / 1e6:.2f}",
            f"{base['payload_sent_per_peer'] / sim_bytes:.2f}",
        ],
        [
            "loopback bytes / 3 (everything on the wire)",
            f"{base['lo_bytes_per_peer'] / 1e6:.2f}",
            f"{base['lo_bytes_per_peer'] / sim_bytes:.2f}",
        ],
    ]
    wire_body = (
        f"Setting: {setting}, unlimited loopback. Per peer, in MB; the last column is the "
        f"ratio to the simulator's figure.\n\n"
        + markdown_table(["what", "MB per peer", "ratio"], wire_rows)
        + f"\n\nThe loopback figure includes everything: gRPC/HTTP2 and TCP/IP framing, the "
        f"DHT's traffic, the newcomers' state download (each joiner downloads θ_g and m once "
        f"at start), and the benchmark's own status queries. Rounds in the simulator: "
        f"{sim_rounds}; in the daemons: {base['rounds']} per peer. The simulator's peak per "
        f"sync (one fragment): {sim_peak / 1e6:.2f} MB per peer."
    )
    write_section(
        "network_wire_bytes", "Bytes on the wire vs the simulator's accounting", wire_body
    )
    if args.wire_only:
        return

    rows = []
    for rate, result in results.items():
        util = result["utilization"]
        rows.append(
            [
                f"{rate:g}" if rate else "unlimited",
                f"{rate / PEERS:.1f}" if rate else "—",
                f"{min(util):.3f} / {sum(util) / len(util):.3f}",
                f"{sum(result['tokens_per_s']) / PEERS:,.0f}",
                f"{max(result['waited_s']):.1f}",
                "yes" if result["hashes_equal"] else "NO",
                f"{result['wall_s']:.0f}",
            ]
        )
    body = (
        f"Setting: {setting}. All three peers in one network namespace whose `lo` is capped "
        f"with `tc qdisc add dev lo root tbf rate R`; the peers share that one link, so each "
        f"has about R/3. Utilization is 1 − wait_fraction (share of wall time training did "
        f"not wait on the network), min / mean over the peers.\n\n"
        f"In theory a peer needs **{need_per_peer:.1f} Mbit/s** for a round of the largest "
        f"fragment to fit in τ = 1 step: 2(M−1)/M × its FP4+zstd size over the measured "
        f"step time ({step_s:.2f} s with three peers sharing this machine's 2 cores) — "
        f"{need_per_peer * PEERS:.0f} Mbit/s on the shared link.\n\n"
        + markdown_table(
            [
                "link (Mbit/s)",
                "per peer (Mbit/s)",
                "utilization min / mean",
                "tokens/s per peer",
                "longest wait (s)",
                "θ_g identical",
                "wall (s)",
            ],
            rows,
        )
    )
    write_section("network_utilization", "Compute utilization on a rate-limited link", body)


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--inner-steps",
        str(args.inner_steps),
        "--fragments",
        str(args.fragments),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--timeout",
        str(args.timeout),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates",
        default="0,256,64,16,4",
        help="link rates in Mbit/s, comma-separated; 0 is unlimited",
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--inner-steps", type=int, default=30)
    parser.add_argument("--fragments", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--wire-only",
        action="store_true",
        help="write only the wire-bytes section (use with --rates 0)",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        Path(args.json).write_text(json.dumps(inside(args)))
    else:
        outside(args)


if __name__ == "__main__":
    main()
