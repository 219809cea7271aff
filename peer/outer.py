"""The outer step of (Streaming) DiLoCo, as maths on flat fp32 tensors.

Symbols follow the papers: θ local parameters, θ_g the global (outer) copy, Δ the outer
gradient, m the Nesterov momentum, α the merge factor. Everything here runs on the CPU in
fp32 with a fixed order of operations, so peers that start from the same θ_g and decode
the same Δ̄ end with bit-identical θ_g (invariant I1), whatever accelerator they train on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def outer_gradient(global_params: torch.Tensor, local_params: torch.Tensor) -> torch.Tensor:
    """Δ = θ_g − θ: how far this peer moved since the last outer step, as a gradient."""
    return global_params.to(torch.float32) - local_params.to(torch.float32)


def weighted_mean(contributions: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Δ̄ = Σ w_m Δ_m / Σ w_m, accumulated in fp32 in the order given.

    The order is part of the result (floating-point addition is not associative), so callers
    pass contributions in an order every peer agrees on.
    """
    if not contributions:
        raise ValueError("weighted_mean needs at least one contribution")
    total_weight = 0.0
    for _, weight in contributions:
        if not weight > 0:
            raise ValueError(f"contribution weights must be positive, got {weight}")
        total_weight += float(weight)
    if len(contributions) == 1:
        # The mean of one contribution is that contribution, exactly; w·Δ/w would round
        # twice whenever w is not a power of two.
        return contributions[0][0].to(torch.float32, copy=True)
    accumulator = torch.zeros_like(contributions[0][0], dtype=torch.float32)
    for delta, weight in contributions:
        accumulator.add_(delta.to(torch.float32), alpha=float(weight))
    return accumulator.div_(total_weight)


def bounded_mean(
    contributions: Sequence[tuple[torch.Tensor, float]], clip_factor: float
) -> tuple[torch.Tensor, int]:
    """Weighted mean with every contribution's L2 norm capped at ``clip_factor`` times the
    median norm (DESIGN §4: one bad peer's influence on a round is bounded).

    Honest peers' outer gradients have norms of the same order; a contribution far larger
    than the median (a bug, or an attack in an open run) is scaled down to the cap instead
    of dominating the mean. ``clip_factor`` 0 disables the cap. Returns the mean and how
    many contributions were scaled.
    """
    if clip_factor <= 0 or len(contributions) < 2:
        return weighted_mean(contributions), 0
    norms = [float(torch.linalg.vector_norm(delta.to(torch.float32))) for delta, _ in contributions]
    ordered = sorted(norms)
    median = ordered[(len(ordered) - 1) // 2]
    cap = clip_factor * median
    bounded = []
    scaled = 0
    for (delta, weight), norm in zip(contributions, norms, strict=True):
        if median > 0 and norm > cap:
            bounded.append((delta.to(torch.float32) * (cap / norm), weight))
            scaled += 1
        else:
            bounded.append((delta, weight))
    return weighted_mean(bounded), scaled


@torch.no_grad()
def nesterov_step(
    global_params: torch.Tensor,
    momentum: torch.Tensor,
    mean_delta: torch.Tensor,
    *,
    lr: float,
    momentum_factor: float,
    nesterov: bool = True,
) -> None:
    """Outer SGD in place: m ← μ·m + Δ̄; θ_g ← θ_g − lr·(Δ̄ + μ·m) (Nesterov) or − lr·m.

    This is torch.optim.SGD's rule (dampening 0) written out, so the update is explicit and
    identical everywhere. μ = 0 gives plain SGD; lr = 1 with μ = 0 sets θ_g to the mean of
    the peers' parameters (FedAvg).
    """
    if momentum_factor == 0.0:
        global_params.sub_(mean_delta, alpha=lr)
        return
    momentum.mul_(momentum_factor).add_(mean_delta)
    update = mean_delta.add(momentum, alpha=momentum_factor) if nesterov else momentum
    global_params.sub_(update, alpha=lr)


def merge(local_params: torch.Tensor, global_params: torch.Tensor, alpha: float) -> torch.Tensor:
    """θ ← α·θ + (1 − α)·θ_g. α = 0 discards the local steps taken while the round flew."""
    if alpha == 0.0:
        return global_params.clone()
    return local_params.to(torch.float32) * alpha + global_params * (1.0 - alpha)


def tensor_hash(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's exact bytes: equal hashes mean bit-identical θ_g."""
    data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()
