"""Codec speed: how fast each wire format encodes and decodes, and how small it gets.

    python -m benchmarks.codec_speed [--numel N] [--repeats R] [--seed S]

For fp4 and int8 (nearest and stochastic rounding, with and without zstd), bf16 and fp32,
this times :func:`peer.codec.encode` and :func:`peer.codec.decode` on the same tensor and
reports MB/s of fp32 input, the time as a multiple of a plain ``tensor.clone()`` of the same
tensor measured in the same run (so figures from different machines can be compared), the
payload size, and what zstd bought.

Two inputs:

* ``normal`` — i.i.d. N(0, 1): the textbook case, close to incompressible once quantized.
* ``outer grad`` — a synthetic outer gradient Δ = θ_g − θ (see :func:`outer_gradient`):
  heavy-tailed across rows, and the difference of two float32 weight tensors, as the
  trainer computes it.

Each figure is the median of ``--repeats`` runs after a warm-up on a small slice. The table
is printed and written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import torch

from benchmarks.report import markdown_table, write_section
from locod.peer.codec import WireFormat, decode, encode

CONFIGS = [
    ("fp4", 0, "nearest"),
    ("fp4", 3, "nearest"),
    ("fp4", 0, "stochastic"),
    ("fp4", 3, "stochastic"),
    ("int8", 0, "nearest"),
    ("int8", 3, "nearest"),
    ("int8", 0, "stochastic"),
    ("int8", 3, "stochastic"),
    ("bf16", 0, "nearest"),
    ("bf16", 3, "nearest"),
    ("fp32", 0, "nearest"),
    ("fp32", 3, "nearest"),
]
"""(codec, zstd level, rounding); the default WireFormat is fp4, zstd 3, nearest."""

T = TypeVar("T")

ROW_SIZE = 4096
INNER_STEPS = 100
INNER_LR = 4e-4


def outer_gradient(numel: int, seed: int) -> torch.Tensor:
    """A synthetic outer gradient Δ = θ_g − θ after H = 100 inner steps, in float32.

    θ_g ~ N(0, 0.02²), a usual initialisation. Each row of 4096 values (one output unit of
    a linear layer, say) gets its own gradient scale, log-normal with σ = 1, so some rows
    move far more than others. Each inner step moves θ by lr·(drift + noise)·row_scale with
    lr = 4e-4, a per-value drift ~ N(0, 0.5²) (the part of the gradient that persists) and
    fresh N(0, 1) noise: Adam-like steps of about lr each. The H steps are summed in closed
    form (H·drift + √H·noise), θ = θ_g − sum is rounded to float32 like real weights, and
    Δ = θ_g − θ is computed in float32 as the trainer does.
    """
    g = torch.Generator().manual_seed(seed)
    theta_g = torch.randn(numel, generator=g) * 0.02
    rows = -(-numel // ROW_SIZE)
    row_scale = torch.exp(torch.randn(rows, generator=g)).repeat_interleave(ROW_SIZE)[:numel]
    drift = torch.randn(numel, generator=g) * 0.5
    noise = torch.randn(numel, generator=g)
    walk = (drift * INNER_STEPS + noise * INNER_STEPS**0.5) * row_scale * INNER_LR
    theta = theta_g - walk
    return theta_g - theta


def _timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(x: torch.Tensor, repeats: int, seed: int) -> tuple[float, list[dict[str, object]]]:
    """Time every config on ``x``; returns the copy's median time and one row per config.

    Copy, encode and decode take turns within each repeat, and the copy's baseline is the
    median over the whole run, so a machine that gets busier or quieter during the run
    shifts both sides of each ratio alike. Each config is warmed up on a small slice first
    (lookup tables, zstd contexts).
    """
    x.clone()
    copy_times: list[float] = []
    results: list[dict[str, object]] = []
    for codec, level, rounding in CONFIGS:
        fmt = WireFormat(codec=codec, zstd_level=level, rounding=rounding)
        gen = torch.Generator().manual_seed(seed)
        decode(encode(x[: 1 << 16], fmt, generator=gen))
        encode_times, decode_times = [], []
        payload = b""
        for _ in range(repeats):
            copy_times.append(_timed(x.clone)[0])
            seconds, payload = _timed(partial(encode, x, fmt, generator=gen))
            encode_times.append(seconds)
            decode_times.append(_timed(partial(decode, payload))[0])
        results.append(
            {
                "codec": codec,
                "zstd": level,
                "rounding": rounding,
                "encode_s": statistics.median(encode_times),
                "decode_s": statistics.median(decode_times),
                "bytes": len(payload),
            }
        )
    return statistics.median(copy_times), results


HEADERS = [
    "data",
    "format",
    "zstd",
    "encode MB/s",
    "encode × copy",
    "decode MB/s",
    "decode × copy",
    "bits/value",
    "bytes",
    "fp32 / bytes",
    "zstd: size change",
]


def _rows(
    name: str, numel: int, copy_s: float, results: Sequence[dict[str, object]]
) -> list[list[object]]:
    """Table rows for one input: the copy first, then one per config."""
    mb = numel * 4 / 1e6
    copy_rate = f"{mb / copy_s:,.0f}"
    rows: list[list[object]] = [
        [name, "clone()", "", copy_rate, "1.0", copy_rate, "1.0", "32.00", f"{numel * 4:,}",
         "1.00", ""]
    ]  # fmt: skip
    # The same codec and rounding without zstd, to show what zstd changed.
    plain = {(r["codec"], r["rounding"]): r["bytes"] for r in results if r["zstd"] == 0}
    for r in results:
        enc, dec, size = _f(r["encode_s"]), _f(r["decode_s"]), int(_f(r["bytes"]))
        change = ""
        if r["zstd"]:
            before = _f(plain[(r["codec"], r["rounding"])])
            change = f"{100 * (size - before) / before:+.1f}%"
        rows.append(
            [
                name,
                f"{r['codec']} {r['rounding']}",
                r["zstd"] or "off",
                f"{mb / enc:,.0f}",
                f"{enc / copy_s:.1f}",
                f"{mb / dec:,.0f}",
                f"{dec / copy_s:.1f}",
                f"{size * 8 / numel:.2f}",
                f"{size:,}",
                f"{numel * 4 / size:.2f}",
                change,
            ]
        )
    return rows


def _f(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Encode/decode speed of the wire formats.")
    parser.add_argument("--numel", type=int, default=1 << 24, help="values per tensor")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    inputs = {
        "normal": torch.randn(args.numel, generator=g),
        "outer grad": outer_gradient(args.numel, args.seed),
    }
    load_before = os.getloadavg()[0]
    table: list[list[object]] = []
    for name, x in inputs.items():
        copy_s, results = measure(x, args.repeats, args.seed)
        table.extend(_rows(name, args.numel, copy_s, results))
    load_after = os.getloadavg()[0]
    text = markdown_table(HEADERS, table)
    body = (
        f"{args.numel:,} float32 values ({args.numel * 4 / 1e6:.0f} MB) per tensor, median "
        f"of {args.repeats} runs, {torch.get_num_threads()} torch threads; 1-minute load "
        f"average {load_before:.1f} before the run and {load_after:.1f} after it on "
        f"{os.cpu_count()} cores (above the core count, other processes were competing and "
        "the many small parallel ops of fp4/int8 suffer most). MB/s are MB of "
        'fp32 input per second; "× copy" is the time as a multiple of `clone()` of the '
        'same tensor in the same run. "zstd: size change" compares with the same format '
        "sent without zstd.\n\n"
        "Inputs: `normal` is i.i.d. N(0, 1). `outer grad` is a synthetic outer gradient "
        "Δ = θ_g − θ: θ_g ~ N(0, 0.02²); θ after 100 Adam-like steps of lr 4e-4 made of a "
        "persistent per-value drift plus fresh noise, scaled per 4096-value row by a "
        "log-normal factor; both rounded to float32 (`outer_gradient` in "
        "`benchmarks/codec_speed.py`).\n\n" + text
    )
    print(body)
    write_section("codec_speed", "Codec speed", body)


if __name__ == "__main__":
    main()
