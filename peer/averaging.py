"""The one interface between the training algorithm and the network.

The trainer says "start averaging fragment p, round r, with this outer gradient and this
weight" and later asks "is the group's mean for (p, r) here?". The simulator answers from
memory (:mod:`peer.simulator`); the daemon answers over gRPC (``daemon.averager``). The
same algorithm code (:mod:`peer.streaming`) runs against both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """One peer's contribution to round ``round`` of fragment ``fragment``."""

    fragment: int
    round: int
    step: int
    """The inner step at which the contribution was taken."""
    delta: torch.Tensor
    """Δ = θ_g − θ for the fragment, flat fp32 on the CPU."""
    weight: float
    """Tokens trained since this peer's last contribution to this fragment."""
    global_hash: str
    """Hash of this peer's θ_g for the fragment before the round: peers compare them (I3)."""


@dataclass(frozen=True, slots=True)
class FragmentState:
    """The outer state of one fragment: global parameters and outer momentum."""

    global_params: torch.Tensor
    momentum: torch.Tensor


@dataclass(frozen=True, slots=True)
class SyncResult:
    """The group's answer for a round."""

    mean: torch.Tensor | None
    """Δ̄, decoded from the bytes every member received; applied after ``adopt`` if both."""
    group_size: int
    """How many peers' contributions are in the mean."""
    adopt: FragmentState | None = None
    """The group's state, taken before applying ``mean`` (repair of a diverged copy): the
    pre-round state with a mean, or the post-round state with ``mean`` None."""
    duration_s: float = 0.0
    """Wall time from start to result, as the averager saw it."""


@dataclass(frozen=True, slots=True)
class SyncFailed:
    """The round produced nothing this peer can apply; θ_g stays as it was."""

    reason: str


SyncOutcome = SyncResult | SyncFailed


class Averager(Protocol):
    """Averages outer gradients with the rest of the group, in the background."""

    def start(self, request: SyncRequest) -> None:
        """Begin averaging; must return promptly (the network work happens elsewhere)."""

    def result(self, fragment: int, round_index: int, timeout_s: float) -> SyncOutcome | None:
        """The outcome of (fragment, round), waiting up to ``timeout_s``; None if not ready."""

    def abandon(self, fragment: int, round_index: int) -> None:
        """Give up on a round whose result is no longer wanted."""
