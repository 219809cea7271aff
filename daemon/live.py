"""A compact live view of a running daemon on the terminal.

On a terminal the view redraws three lines in place about once a second; when the output
is not a terminal (a log collector, a test) it prints one summary line every
``quiet_interval_s`` instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from locod.daemon.context import PeerContext
from locod.daemon.status import StatusBoard, _bytes


def render(board: StatusBoard, ctx: PeerContext) -> list[str]:
    """The view's lines for the board's current figures."""
    with board.lock:
        eval_loss = f"{board.eval_loss:.3f}" if board.eval_loss == board.eval_loss else "–"
        train_loss = f"{board.train_loss:.3f}" if board.train_loss == board.train_loss else "–"
        head = f"locod {ctx.cfg.run_name} · peer {ctx.peer_id[:8]} · {board.state}" + (
            f" ({board.note})" if board.note else ""
        )
        if board.download_total:
            head += f" · download {_bytes(board.download_done)}/{_bytes(board.download_total)}"
        first = (
            f"{head} · step {board.step} · {board.tokens_per_s:,.0f} tok/s · "
            f"loss {train_loss} · eval {eval_loss}"
        )
        second = (
            f"peers {len(ctx.live_peers())} · rounds {board.rounds_applied} "
            f"(failed {board.rounds_failed}, skipped {board.rounds_skipped}, repairs "
            f"{board.repairs}) · sent {_bytes(ctx.traffic.bytes_sent)} · received "
            f"{_bytes(ctx.traffic.bytes_received)} · waited {board.waited_s:.1f}s "
            f"({100 * board.wait_fraction:.1f}%)"
        )
        third = "fragments " + "  ".join(
            f"{f.index}:r{f.round}×{f.group_size}" for f in board.fragments
        )
    return [first, second, third]


class LiveView:
    def __init__(
        self,
        *,
        enabled: bool,
        stream: TextIO | None = None,
        interval_s: float = 1.0,
        quiet_interval_s: float = 10.0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.interactive = enabled and self.stream.isatty()
        self.interval_s = interval_s if self.interactive else quiet_interval_s
        self._last = 0.0
        self._drawn = 0

    def update(self, board: StatusBoard, ctx: PeerContext, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        lines = render(board, ctx)
        if self.interactive:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            for line in lines:
                self.stream.write("\x1b[2K" + line + "\n")
            self._drawn = len(lines)
        else:
            self.stream.write(" | ".join(lines) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line above the view (the view is redrawn below it next time)."""
        if self.interactive and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()
