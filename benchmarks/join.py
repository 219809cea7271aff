"""How long until a newcomer is training: state download from one donor and from several.

``python -m benchmarks.join`` starts, in a fresh network namespace (optionally with its
loopback rate-limited), D donor peers that trained a few steps and keep serving, then a
newcomer that joins them. It measures the newcomer's time from process start to its first
training step, the state download inside that, and compares the download with the physical
floor. Two topologies: all peers sharing one capped link (several donors cannot beat the
floor together), and every peer on its own capped uplink, as sites on the internet are
(several donors send in parallel, so the floor falls with their number).
Needs root for the namespaces.
"""

from __future__ import annotations

import argparse
import json
import re
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


def measure(cluster: Any, donors: int, timeout_s: float) -> dict[str, Any]:
    """Start ``donors`` peers, let them train and serve, then time a newcomer joining them."""
    from cluster import wait_for  # type: ignore[import-not-found]

    try:
        for index in range(donors):
            cluster.start(f"donor{index}", "--min-peers", str(donors))
        cluster.wait_all(lambda s: s["state"] == "finished", timeout_s, "donors to serve")
        began = time.monotonic()
        newcomer = cluster.start("newcomer")
        wait_for(
            lambda: newcomer.status()["state"] in ("training", "finished"),
            timeout_s,
            "the newcomer to train",
            interval_s=0.05,
        )
        to_training = time.monotonic() - began
        status = newcomer.status()
        line = re.search(r"downloaded (\d+) bytes of state from (.*?) in ([\d.]+)s", newcomer.log())
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


def inside(args: argparse.Namespace) -> dict[str, Any]:
    """Shared link: run inside one namespace, every peer on its loopback."""
    from cluster import Cluster

    with tempfile.TemporaryDirectory(prefix="locod-join-") as scratch:
        return measure(Cluster(Path(scratch), common=_settings(args)), args.donors, args.timeout)


def with_uplinks(args: argparse.Namespace, rate: float, donors: int) -> dict[str, Any]:
    """Own uplinks: every peer in its own namespace, its uplink capped at ``rate``."""
    from cluster import Cluster

    from benchmarks.netns import star

    names = [f"donor{index}" for index in range(donors)] + ["newcomer"]
    with (
        star(names, rate or None) as sites,
        tempfile.TemporaryDirectory(prefix="locod-join-") as scratch,
    ):
        cluster = Cluster(
            Path(scratch),
            common=_settings(args),
            prefixes={name: site.prefix for name, site in sites.items()},
            peer_args={name: _listen_on(site.ip) for name, site in sites.items()},
        )
        return measure(cluster, donors, args.timeout)


def _listen_on(ip: str) -> list[str]:
    return ["--listen", f"{ip}:0", "--dht-listen", f"/ip4/{ip}/tcp/0"]


def in_shared_namespace(args: argparse.Namespace, rate: float, donors: int) -> dict[str, Any]:
    """Run :func:`inside` in a fresh namespace whose one ``lo`` is capped at ``rate``."""
    from benchmarks.netns import run_inside

    arguments = ["--model", args.model, "--donors", str(donors), "--timeout", str(args.timeout)]
    return run_inside("benchmarks.join", arguments, rate or None)


TOPOLOGIES = {
    "shared": ("one shared link", in_shared_namespace),
    "uplinks": ("own uplink each", with_uplinks),
}


def floor_s(state_bytes: int, rate_mbit: float, topology: str, donors: int) -> float | None:
    """The physical floor: on a shared link the state crosses it once at ``rate``; with own
    uplinks (downlinks not limited) D donors send a D-th each, in parallel."""
    if not rate_mbit:
        return None
    parallel = donors if topology == "uplinks" else 1
    return state_bytes * 8 / (rate_mbit * 1e6 * parallel)


def outside(args: argparse.Namespace) -> None:
    from benchmarks.netns import NamespaceError, check_available
    from benchmarks.report import markdown_table, write_section

    try:
        check_available()
    except NamespaceError as error:
        raise SystemExit(f"cannot run: {error}") from None
    rows = []
    for topology in args.topologies.split(","):
        label, run = TOPOLOGIES[topology]
        for rate in [float(r) for r in args.rates.split(",")]:
            if topology == "uplinks" and not rate:
                continue  # unlimited own links are the unlimited shared loopback again
            for donors in [int(d) for d in args.donors_list.split(",")]:
                print(f"== {label}, rate {rate or 'unlimited'}, {donors} donor(s)", flush=True)
                result = run(args, rate, donors)
                print(json.dumps(result), flush=True)
                floor = floor_s(result["state_bytes"], rate, topology, donors)
                rows.append(
                    [
                        label,
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
        f"of every fragment (fp32). 'One shared link': every peer in one namespace whose "
        f"`lo` is capped at the rate, so all transfers share it and the floor is state size "
        f"/ rate whatever the donors. 'Own uplink each': every peer in its own namespace, "
        f"joined by a bridge, with the rate capping what it sends (as a site's uplink; "
        f"downlinks not limited), so D donors can send D times as fast and the floor is "
        f"state size / (D × rate). 'To training' runs from the newcomer's process start to "
        f"its first inner step: Python and torch start-up, the corpus, the DHT, the download "
        f"and the model build included.\n\n"
        + markdown_table(
            [
                "links",
                "rate (Mbit/s)",
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
    parser.add_argument("--rates", default="0,100,25", help="Mbit/s, comma-separated; 0 unlimited")
    parser.add_argument("--donors-list", default="1,3")
    parser.add_argument(
        "--topologies",
        default="shared,uplinks",
        help="shared: one capped link for all; uplinks: every peer its own capped uplink",
    )
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
