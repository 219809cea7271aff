"""The CUDA training path, checked and measured in a few minutes on a machine with GPUs.

    python -m benchmarks.gpu_check              # on a GPU machine: every check, < 8 minutes
    python -m benchmarks.gpu_check --write      # ... and its section of docs/benchmarks.md
    python -m benchmarks.gpu_check --device cpu --quick   # the same code path on the CPU

Without a CUDA device (and without ``--device cpu``) it says so and exits 0. What it does:

1. ``small`` and ``base`` on ``cuda:0`` with bf16 autocast: the loss falls, tokens/s of the
   inner step, peak GPU memory;
2. the time one sync of each fragment blocks training, in its parts: the device → pinned
   host copy of θ (``flatten``), the outer Nesterov step and merge on the CPU, the copy
   back (``assign_flat``);
3. two sites on loopback (``locod start``), one GPU each where the machine has two (both on
   ``cuda:0`` otherwise): tokens/s, the share of time training waited on the network, and
   whether θ_g agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import markdown_table, write_section
from locod.peer.config import OuterConfig
from locod.peer.data import BatchSampler, load_corpus
from locod.peer.fragments import (
    assign_flat,
    auto_fragment_count,
    find_blocks,
    flatten,
    partition,
)
from locod.peer.inner import InnerConfig, InnerTrainer
from locod.peer.model import build_model, count_parameters, model_config
from locod.peer.outer import merge, nesterov_step, outer_gradient

ROOT = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class ModelFigures:
    model: str
    parameters: int
    batch: str
    autocast_bf16: bool
    first_loss: float
    last_loss: float
    tokens_per_s: float
    peak_memory_gb: float
    sync_blocking_ms: dict[str, float] = field(default_factory=dict)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_model(name: str, device: torch.device, batch: int, seq: int, steps: int) -> ModelFigures:
    """Train ``steps`` steps of preset ``name``; time them and one sync per fragment."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    corpus = load_corpus()
    inner = InnerConfig(batch_size=batch, seq_len=seq, warmup_steps=5, lr=6e-4)
    trainer = InnerTrainer(build_model(model_config(name), seed=0), inner, device=device)
    sampler = BatchSampler(corpus.train, batch_size=batch, seq_len=seq, seed=1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        probe = trainer.model(sampler.next()[0][:1].to(device))
    autocast = probe.dtype == torch.bfloat16
    losses = [trainer.train_step(*sampler.next()) for _ in range(3)]  # warm-up
    _synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        losses.append(trainer.train_step(*sampler.next()))
    _synchronize(device)
    elapsed = time.perf_counter() - began
    model = trainer.model
    blocks = find_blocks(model) or []
    fragments = partition(model, blocks, auto_fragment_count(len(blocks)), "strided")
    outer = OuterConfig()
    blocking: dict[str, float] = {"flatten": 0.0, "outer step and merge": 0.0, "assign": 0.0}
    for fragment in fragments:
        global_params = flatten(fragment.params).clone()
        momentum = torch.zeros_like(global_params)
        t0 = time.perf_counter()
        local = flatten(fragment.params)
        t1 = time.perf_counter()
        delta = outer_gradient(global_params, local)
        nesterov_step(
            global_params, momentum, delta, lr=outer.outer_lr, momentum_factor=0.9, nesterov=True
        )
        merged = merge(local, global_params, outer.alpha)
        t2 = time.perf_counter()
        assign_flat(fragment.params, merged)
        _synchronize(device)
        t3 = time.perf_counter()
        blocking["flatten"] = max(blocking["flatten"], 1000 * (t1 - t0))
        blocking["outer step and merge"] = max(blocking["outer step and merge"], 1000 * (t2 - t1))
        blocking["assign"] = max(blocking["assign"], 1000 * (t3 - t2))
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0
    return ModelFigures(
        model=name,
        parameters=count_parameters(model),
        batch=f"{batch} × {seq}",
        autocast_bf16=autocast,
        first_loss=round(losses[0], 4),
        last_loss=round(losses[-1], 4),
        tokens_per_s=round(steps * batch * seq / elapsed, 1),
        peak_memory_gb=round(peak, 3),
        sync_blocking_ms={k: round(v, 2) for k, v in blocking.items()},
    )


def two_sites(devices: list[str], steps: int, root: Path, model: str) -> dict[str, Any]:
    """A founder and a joiner (``locod start``) on loopback, each on its device."""
    from locod.daemon.status import query_status

    common = [
        "--model",
        model,
        "--batch-size",
        "8",
        "--seq-len",
        "128",
        "--inner-steps",
        "20",
        "--max-steps",
        str(steps),
        "--linger",
        "--eval-every",
        "0",
        "--min-peers",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--dht-listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-live",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    processes = []
    try:
        founder_out = root / "founder.out"
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "locod",
                    "start",
                    *common,
                    "--device",
                    devices[0],
                    "--state-dir",
                    str(root / "founder"),
                ],
                cwd=ROOT,
                env=env,
                stdout=founder_out.open("wb"),
                stderr=subprocess.DEVNULL,
            )
        )
        deadline = time.monotonic() + 180
        join = ""
        while not join and time.monotonic() < deadline:
            for line in founder_out.read_text().splitlines():
                if "JOIN " in line:
                    join = line.split("--join ", 1)[1].split()[0]
            time.sleep(0.5)
        if not join:
            raise RuntimeError("the founder did not start")
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "locod",
                    "start",
                    *common,
                    "--device",
                    devices[1],
                    "--state-dir",
                    str(root / "joiner"),
                    "--join",
                    join,
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        addresses = []
        for name in ("founder", "joiner"):
            info = root / name / "daemon.json"
            while not info.exists() and time.monotonic() < deadline + 120:
                time.sleep(0.5)
            addresses.append(json.loads(info.read_text())["listen"])
        statuses: list[dict[str, Any]] = []
        while time.monotonic() < deadline + 420:
            statuses = [query_status(a) for a in addresses]
            if all(s["state"] == "finished" for s in statuses):
                break
            time.sleep(2)
        hashes = [[f["global_hash"] for f in s["fragments"]] for s in statuses]
        return {
            "devices": devices,
            "model": model,
            "steps": steps,
            "tokens_per_s": [round(s["tokens_per_s"], 1) for s in statuses],
            "wait_fraction": [round(s["wait_fraction"], 4) for s in statuses],
            "rounds_applied": [s["rounds_applied"] for s in statuses],
            "theta_g_agrees": len(hashes) == 2 and hashes[0] == hashes[1],
        }
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md")
    options = parser.parse_args()
    if options.device == "cuda" and not torch.cuda.is_available():
        print("no GPU: torch finds no CUDA device here; skipping the CUDA checks (exit 0)")
        return 0
    device = torch.device("cuda:0" if options.device == "cuda" else "cpu")
    torch.manual_seed(0)
    if options.quick:
        plans = [("tiny", 4, 64, 5)]
    else:
        plans = [("small", 32, 512, 40), ("base", 16, 1024, 20)]
    figures = [check_model(name, device, b, s, n) for name, b, s, n in plans]
    for f in figures:
        print(json.dumps(asdict(f)), flush=True)
        if not f.last_loss < f.first_loss:
            print(f"FAIL: {f.model}'s loss did not fall ({f.first_loss} → {f.last_loss})")
            return 1
        if device.type == "cuda" and not f.autocast_bf16:
            print(f"FAIL: {f.model} did not run in bf16 under autocast")
            return 1
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    devices = ["cuda:0", "cuda:1"] if count >= 2 else [str(device), str(device)]
    with tempfile.TemporaryDirectory() as scratch:
        model = "tiny" if options.quick else "small"
        sites = two_sites(devices, 40 if options.quick else 200, Path(scratch), model)
    print(json.dumps(sites), flush=True)
    rows = [
        [
            f.model,
            f"{f.parameters:,}",
            f.batch,
            "yes" if f.autocast_bf16 else "no",
            f"{f.first_loss} → {f.last_loss}",
            f"{f.tokens_per_s:,.0f}",
            f.peak_memory_gb,
            " / ".join(f"{v}" for v in f.sync_blocking_ms.values()),
        ]
        for f in figures
    ]
    body = (
        markdown_table(
            [
                "model",
                "parameters",
                "batch",
                "bf16 autocast",
                "loss",
                "tokens/s",
                "peak GB",
                "sync blocks (ms): flatten / outer step + merge / assign",
            ],
            rows,
        )
        + f"\n\nTwo sites ({', '.join(sites['devices'])}), `{sites['model']}`, "
        f"{sites['steps']} steps: "
        f"tokens/s {sites['tokens_per_s']}, time waiting on the network "
        f"{sites['wait_fraction']}, rounds {sites['rounds_applied']}, θ_g identical: "
        f"{sites['theta_g_agrees']}."
    )
    print(body)
    if options.write:
        write_section(
            "gpu_check",
            f"The CUDA path ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'})",
            body,
        )
    if not sites["theta_g_agrees"]:
        print("FAIL: the two sites' θ_g differ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
