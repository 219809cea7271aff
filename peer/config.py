"""Settings of the Streaming DiLoCo algorithm (DESIGN §1), typed and validated.

The names are the papers' symbols spelled out: ``inner_steps`` is H, ``fragments`` is P,
``overlap`` is τ, ``alpha`` is α. Every peer of a run must hold the same values (the
daemon checks this through the run config's hash).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from locod.peer.codec import WireFormat
from locod.peer.fragments import LAYOUTS

LATE_POLICIES = ("apply", "skip")


@dataclass(kw_only=True, slots=True)
class OuterConfig:
    """Streaming DiLoCo's outer loop."""

    inner_steps: int = 100
    """H: inner steps between two syncs of the same fragment."""
    fragments: int = 0
    """P: number of fragments; 0 means one per ~3 blocks plus the embeddings' fragment."""
    layout: str = "strided"
    """How blocks are spread over fragments: ``strided`` (the paper's) or ``sequential``."""
    overlap: int = 1
    """τ: inner steps between sending a fragment and applying the group's result."""
    alpha: float = 0.5
    """α: merge θ ← α·θ + (1 − α)·θ_g; 0 discards the τ local steps."""
    outer_lr: float = 0.4
    """Outer learning rate (DiLoCo used 0.7; Streaming DiLoCo 0.4)."""
    outer_momentum: float = 0.9
    """Outer momentum μ; 0 gives plain outer SGD."""
    nesterov: bool = True
    """Nesterov momentum for the outer step (the papers' choice)."""
    wire: WireFormat = field(default_factory=WireFormat)
    """How outer gradients travel: codec, block size, zstd level, rounding."""
    late_wait_s: float = 60.0
    """How long training waits for a result that is later than τ steps."""
    late_policy: str = "apply"
    """After waiting ``late_wait_s``: ``apply`` the result whenever it comes, or ``skip`` it."""
    clip_factor: float = 8.0
    """A reducer caps each contribution's norm at this multiple of the median (0: off)."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps (H) must be at least 1, got {self.inner_steps}")
        if self.fragments < 0:
            raise ValueError(f"fragments (P) must be 0 (auto) or more, got {self.fragments}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.overlap < 0:
            raise ValueError(f"overlap (τ) must be 0 or more, got {self.overlap}")
        if self.overlap >= self.inner_steps:
            raise ValueError(
                f"overlap (τ={self.overlap}) must be smaller than inner_steps "
                f"(H={self.inner_steps}): a fragment's result must arrive before its next "
                "round starts"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be positive, got {self.outer_lr}")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        if self.late_wait_s < 0:
            raise ValueError(f"late_wait_s must be 0 or more, got {self.late_wait_s}")
        if self.clip_factor < 0:
            raise ValueError(f"clip_factor must be 0 (off) or positive, got {self.clip_factor}")
        if self.late_policy not in LATE_POLICIES:
            raise ValueError(
                f"late_policy must be one of {', '.join(LATE_POLICIES)}, got {self.late_policy!r}"
            )
