"""Streaming DiLoCo's outer loop for one peer (Douillard et al. 2025, arXiv 2501.18512).

Algorithm 2 of the paper, with the symbols of DESIGN §1:

* after inner step t, every fragment p due at t (``fragments.fragments_due``) computes its
  outer gradient Δ[p] = θ_g[p] − θ[p] and hands it to the averager with its token weight:
  :meth:`StreamingDiLoCo.prepare` (torchft calls this ``prepare_sync``);
* τ steps later (``overlap``), :meth:`StreamingDiLoCo.perform` takes the group's mean Δ̄[p],
  runs the outer Nesterov step on θ_g[p] and merges θ[p] ← α·θ[p] + (1 − α)·θ_g[p]
  (torchft: ``perform_sync``). Training continues in between: that gap is the overlap.

The split into two calls is what lets a simulator drive M peers in lock step (all prepare,
then all perform) and lets the daemon overlap communication with computation.
DiLoCo (arXiv 2311.08105) is the special case P = 1, τ = 0, α = 0.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from locod.peer.averaging import Averager, FragmentState, SyncFailed, SyncRequest, SyncResult
from locod.peer.config import OuterConfig
from locod.peer.fragments import (
    Fragment,
    assign_flat,
    flatten,
    fragments_due,
    offset,
    round_at,
    validate_schedule,
)
from locod.peer.outer import merge, nesterov_step, outer_gradient, tensor_hash


@dataclass(slots=True)
class _InFlight:
    round: int
    sent_at: int
    apply_at: int
    weight: float
    waited_once: bool = False


@dataclass(slots=True)
class RoundRecord:
    """What happened to one round of one fragment, for status and logs."""

    fragment: int = 0
    round: int = -1
    applied: bool = False
    group_size: int = 0
    duration_s: float = 0.0
    outcome: str = "none"


@dataclass(slots=True)
class OuterStats:
    """Counters over the peer's lifetime."""

    rounds_started: int = 0
    rounds_applied: int = 0
    rounds_failed: int = 0
    rounds_skipped: int = 0
    repairs: int = 0
    wait_s: float = 0.0
    """Time training spent blocked on the network (invariant I4 reports this)."""
    last: dict[int, RoundRecord] = field(default_factory=dict)
    history: deque[RoundRecord] = field(default_factory=lambda: deque(maxlen=1000))
    """The latest rounds of every fragment, oldest first."""

    def record(self, record: RoundRecord) -> None:
        self.last[record.fragment] = record
        self.history.append(record)


class StreamingDiLoCo:
    """The outer state (θ_g, m per fragment) and the schedule of one peer."""

    def __init__(
        self,
        fragments: Sequence[Fragment],
        cfg: OuterConfig,
        averager: Averager,
        *,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
    ) -> None:
        validate_schedule(cfg.inner_steps, len(fragments))
        self.fragments = list(fragments)
        self.cfg = cfg
        self.averager = averager
        self.clock = clock
        self.log = log or (lambda _message: None)
        # θ_g and m live on the CPU in fp32 whatever device trains: the outer step must be
        # bit-identical on every peer (I1), and only the active fragment needs the accelerator.
        self.global_params = [flatten(f.params) for f in self.fragments]
        self.momentum = [torch.zeros_like(g) for g in self.global_params]
        self.tokens_since = [0.0] * len(self.fragments)
        self.in_flight: dict[int, _InFlight] = {}
        self.stats = OuterStats()
        # Held while θ_g or m change, so another thread (a daemon serving its state to a
        # newcomer) can copy a consistent snapshot. Never held while waiting on the network.
        self.lock = threading.RLock()
        self.version = 0
        """Counts changes to the outer state: equal versions mean identical θ_g and m."""

    @property
    def num_fragments(self) -> int:
        return len(self.fragments)

    def add_tokens(self, count: float) -> None:
        """Record tokens trained in one inner step (every fragment saw them)."""
        for p in range(self.num_fragments):
            self.tokens_since[p] += count

    def global_hash(self, fragment: int) -> str:
        """Hash of θ_g[fragment]: equal on all peers that applied the same rounds (I1)."""
        return tensor_hash(self.global_params[fragment])

    # -- the two halves of a sync -------------------------------------------------------

    def prepare(self, step: int) -> list[int]:
        """Send every fragment due after inner step ``step``; returns their indices."""
        started = []
        for p in fragments_due(step, self.num_fragments, self.cfg.inner_steps):
            if p in self.in_flight:
                # A result still outstanding from the previous round must land (or be given
                # up) first: the next Δ is measured from the θ_g it produces.
                self._resolve(p, step, final=True)
            self._start(p, round_at(step, p, self.num_fragments, self.cfg.inner_steps), step)
            started.append(p)
        return started

    def perform(self, step: int) -> list[int]:
        """Apply every round whose result is due by ``step``; returns fragments applied."""
        applied = []
        for p in sorted(self.in_flight):
            if self.in_flight[p].apply_at <= step and self._resolve(p, step, final=False):
                applied.append(p)
        return applied

    def flush(self, step: int) -> list[int]:
        """Send every fragment that trained since its last contribution, due at once.

        Used at the end of a run so the outer parameters hold all of the training; the
        caller applies the results with ``perform(step)`` (after every simulated peer has
        flushed, in the simulator).
        """
        self.drain(step)
        started = []
        for p in range(self.num_fragments):
            if self.tokens_since[p] > 0:
                self._start(p, self._next_round(p, step), step, apply_at=step)
                started.append(p)
        return started

    def drain(self, step: int) -> None:
        """Resolve every round in flight, waiting up to the late bound for each."""
        for p in sorted(self.in_flight):
            self._resolve(p, step, final=True)

    # -- internals -----------------------------------------------------------------------

    def _next_round(self, p: int, step: int) -> int:
        """The first round index no scheduled sync up to ``step`` has used."""
        last = self.stats.last.get(p)
        t_p = offset(p, self.num_fragments, self.cfg.inner_steps)
        scheduled = max(0, (step - t_p) // self.cfg.inner_steps)
        return max(scheduled, last.round + 1 if last else 0)

    def _start(self, p: int, round_index: int, step: int, apply_at: int | None = None) -> None:
        fragment = self.fragments[p]
        delta = outer_gradient(self.global_params[p], flatten(fragment.params))
        weight = self.tokens_since[p]
        self.tokens_since[p] = 0.0
        self.averager.start(
            SyncRequest(
                fragment=p,
                round=round_index,
                step=step,
                delta=delta,
                weight=max(weight, 1.0),
                global_hash=self.global_hash(p),
            )
        )
        self.in_flight[p] = _InFlight(
            round=round_index,
            sent_at=step,
            apply_at=step + self.cfg.overlap if apply_at is None else apply_at,
            weight=weight,
        )
        self.stats.rounds_started += 1

    def _resolve(self, p: int, step: int, *, final: bool) -> bool:
        """Try to finish fragment p's round in flight; True if a result was applied."""
        flight = self.in_flight[p]
        # Wait up to the bound the first time the result is due (and when it must land now);
        # after that, with late_policy "apply", only look without blocking.
        timeout = self.cfg.late_wait_s if (final or not flight.waited_once) else 0.0
        flight.waited_once = True
        began = self.clock()
        outcome = self.averager.result(p, flight.round, timeout)
        self.stats.wait_s += self.clock() - began
        if outcome is None:
            if final or self.cfg.late_policy == "skip":
                self.averager.abandon(p, flight.round)
                self._give_up(p, flight, "skipped", f"no result after {timeout:.1f}s")
                self.stats.rounds_skipped += 1
            return False
        del self.in_flight[p]
        if isinstance(outcome, SyncFailed):
            self._give_up(p, flight, "failed", outcome.reason)
            self.stats.rounds_failed += 1
            return False
        self._apply(p, flight, outcome)
        return True

    def _give_up(self, p: int, flight: _InFlight, outcome: str, reason: str) -> None:
        self.in_flight.pop(p, None)
        # The progress in Δ is still in θ − θ_g; count its tokens again for the next round.
        self.tokens_since[p] += flight.weight
        self.stats.record(RoundRecord(fragment=p, round=flight.round, outcome=outcome))
        self.log(f"fragment {p} round {flight.round} {outcome}: {reason}")

    def _apply(self, p: int, flight: _InFlight, result: SyncResult) -> None:
        if result.adopt is None and result.mean is None:
            raise ValueError("a SyncResult needs a mean or a state to adopt")
        with self.lock:
            self._apply_locked(p, flight, result)
            self.version += 1

    def _apply_locked(self, p: int, flight: _InFlight, result: SyncResult) -> None:
        if result.adopt is not None:
            # Repair: take the group's state (pre-round, with a mean to apply on top, or
            # post-round, with none).
            self.adopt(p, result.adopt)
            self.stats.repairs += 1
        if result.mean is not None:
            nesterov_step(
                self.global_params[p],
                self.momentum[p],
                result.mean,
                lr=self.cfg.outer_lr,
                momentum_factor=self.cfg.outer_momentum,
                nesterov=self.cfg.nesterov,
            )
        params = self.fragments[p].params
        assign_flat(params, merge(flatten(params), self.global_params[p], self.cfg.alpha))
        self.stats.rounds_applied += 1
        self.stats.record(
            RoundRecord(
                fragment=p,
                round=flight.round,
                applied=True,
                group_size=result.group_size,
                duration_s=result.duration_s,
                outcome="repaired" if result.adopt is not None else "applied",
            )
        )

    def adopt(self, p: int, state: FragmentState) -> None:
        """Replace fragment p's outer state with the group's (repair, or a joiner's download)."""
        expected = self.global_params[p].numel()
        for name, tensor in (("global", state.global_params), ("momentum", state.momentum)):
            if tensor.numel() != expected:
                raise ValueError(
                    f"fragment {p} {name} state has {tensor.numel()} values, expected {expected}"
                )
        with self.lock:
            self.global_params[p] = state.global_params.to(torch.float32).clone()
            self.momentum[p] = state.momentum.to(torch.float32).clone()
            self.version += 1

    def mark_round(self, p: int, round_index: int) -> None:
        """Record that fragment p's outer state is as of ``round_index`` (after a download)."""
        self.stats.last[p] = RoundRecord(
            fragment=p, round=round_index, applied=round_index >= 0, outcome="downloaded"
        )

    def reset_local_to_global(self) -> None:
        """θ ← θ_g for every fragment (a joiner starts from the downloaded state)."""
        for fragment, global_params in zip(self.fragments, self.global_params, strict=True):
            assign_flat(fragment.params, global_params)

    def state_dict(self) -> dict[str, object]:
        """Outer state for checkpoints and state download."""
        return {
            "global_params": [g.clone() for g in self.global_params],
            "momentum": [m.clone() for m in self.momentum],
            "tokens_since": list(self.tokens_since),
            "last_rounds": {p: r.round for p, r in self.stats.last.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        globals_ = state["global_params"]
        momenta = state["momentum"]
        if not isinstance(globals_, list) or not isinstance(momenta, list):
            raise ValueError("outer state must hold lists of tensors")
        if len(globals_) != self.num_fragments or len(momenta) != self.num_fragments:
            raise ValueError(
                f"outer state has {len(globals_)} fragments, this model has {self.num_fragments}"
            )
        for p, (g, m) in enumerate(zip(globals_, momenta, strict=True)):
            self.adopt(p, FragmentState(global_params=g, momentum=m))
        tokens = state.get("tokens_since")
        if isinstance(tokens, list) and len(tokens) == self.num_fragments:
            self.tokens_since = [float(t) for t in tokens]
        rounds = state.get("last_rounds")
        if isinstance(rounds, dict):
            for p, r in rounds.items():
                self.stats.last[int(p)] = RoundRecord(
                    fragment=int(p), round=int(r), applied=True, outcome="restored"
                )
