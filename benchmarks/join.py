"""How long until a newcomer is training: state download from one donor and from several.

``python -m benchmarks.join`` starts, in a fresh network namespace (optionally with its
loopback rate-limited), D donor peers that trained a few steps and keep serving, then a
newcomer that joins them. It measures the newcomer's time from process start to its first
training step, the state download inside that, and compares the download with the physical
floor: the state's size over the link rate. All peers share the namespace's one link, so
with a limited rate several donors cannot beat the floor together; they help when one
donor is the bottleneck (its CPU, or its own uplink on a real network).
Needs root for the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _settings(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--inner-steps",
        "20",
        "--eval-every",
        "0",
        "--listen",
        "127.0.0.1:0",
        "--dht-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-live",
        "--max-steps",
        "2",
        "--linger",
        "--chunk-timeout",
        "120",
    ]


def inside(args: argparse.Namespace) -> dict[str, Any]:
    from cluster import Cluster, wait_for  # type: ignore[import-not-found]

    with tempfile.TemporaryDirectory(prefix="locod-join-") as scratch:
        cluster = Cluster(Path(scratch), common=_settings(args))
        try:
            for index in range(args.donors):
                cluster.start(f"donor{index}", "--min-peers", str(args.donors))
            cluster.wait_all(lambda s: s["state"] == "finished", args.timeout, "donors to serve")
            began = time.monotonic()
            newcomer = cluster.start("newcomer")
            wait_for(
                lambda: newcomer.status()["state"] in ("training", "finished"),
                args.timeout,
                "the newcomer to train",
                interval_s=0.05,
            )
            to_training = time.monotonic() - began
            status = newcomer.status()
            line = re.search(
                r"downloaded (\d+) bytes of state from (.*?) in ([\d.]+)s", newcomer.log()
            )
            if line is None:
                raise RuntimeError("the newcomer did not log its download:\n" + newcomer.log())
            return {
                "to_training_s": to_training,
                "download_s": float(line.group(3)),
                "state_bytes": int(line.group(1)),
                "donors_used": len(line.group(2).split(", ")),
                "downloaded_total": status["download_total"],
            }
        finally:
            cluster.stop_all()


def outside(args: argparse.Namespace) -> None:
    from benchmarks.netns import NamespaceError, check_available, namespace
    from benchmarks.report import markdown_table, write_section

    try:
        check_available()
    except NamespaceError as error:
        raise SystemExit(f"cannot run: {error}") from None
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for donors in [int(d) for d in args.donors_list.split(",")]:
            print(f"== rate {rate or 'unlimited'}, {donors} donor(s)", flush=True)
            with (
                namespace(f"locod-join-{os.getpid()}", rate or None) as prefix,
                tempfile.NamedTemporaryFile(suffix=".json") as out,
            ):
                subprocess.run(
                    [
                        *prefix,
                        sys.executable,
                        "-m",
                        "benchmarks.join",
                        "--inside",
                        "--json",
                        out.name,
                        "--model",
                        args.model,
                        "--donors",
                        str(donors),
                        "--timeout",
                        str(args.timeout),
                    ],
                    cwd=ROOT,
                    check=True,
                )
                result = json.loads(Path(out.name).read_text())
            print(json.dumps(result), flush=True)
            floor = result["state_bytes"] * 8 / (rate * 1e6) if rate else None
            rows.append(
                [
                    f"{rate:g}" if rate else "unlimited",
                    donors,
                    result["donors_used"],
                    f"{result['state_bytes'] / 1e6:.1f}",
                    f"{floor:.2f}" if floor else "—",
                    f"{result['download_s']:.2f}",
                    f"{result['download_s'] / floor:.2f}" if floor else "—",
                    f"{result['to_training_s']:.1f}",
                ]
            )
    body = (
        f"Model `{args.model}`; the state a newcomer downloads is θ_g and the outer momentum "
        f"of every fragment (fp32). Floor = state size / link rate. 'To training' runs from "
        f"the newcomer's process start to its first inner step: Python and torch start-up, "
        f"the corpus, the DHT, the download and the model build included.\n\n"
        + markdown_table(
            [
                "link (Mbit/s)",
                "donors",
                "donors used",
                "state (MB)",
                "floor (s)",
                "download (s)",
                "download / floor",
                "to training (s)",
            ],
            rows,
        )
    )
    write_section("join_time", "Time for a newcomer to be training", body)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--rates", default="0,100", help="Mbit/s, comma-separated; 0 unlimited")
    parser.add_argument("--donors-list", default="1,3")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--donors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        Path(args.json).write_text(json.dumps(inside(args)))
    else:
        outside(args)


if __name__ == "__main__":
    main()
