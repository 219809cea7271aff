"""Fragments and the sync schedule (Streaming DiLoCo §2.2), as pure functions.

Every parameter belongs to exactly one of P fragments. Fragment 0 holds everything that
is not in a transformer block (embeddings, final norm, output head); blocks are spread over
fragments 1..P−1, strided by default (block i → fragment 1 + i mod (P−1)), the paper's
choice, or in contiguous runs (``sequential``). P = 1 puts the whole model in fragment 0.

Fragment p syncs at the steps t_p + k·H for k ≥ 1, with offset t_p = ⌊p·H/P⌋, so every
fragment's outer gradient covers exactly H inner steps and some fragment is in flight every
H/P steps. Round r of fragment p is its (r+1)-th sync. Every peer derives the same schedule
from the step counter alone: no agreement is needed to know what to send when.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

LAYOUTS = ("strided", "sequential")
BLOCKS_PER_FRAGMENT = 3
"""The paper's fragment size at scale, used when the number of fragments is 'auto'."""


@dataclass(frozen=True, slots=True)
class Fragment:
    """One fragment: its index, parameter names and the parameters themselves."""

    index: int
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def auto_fragment_count(num_blocks: int) -> int:
    """1 (embeddings and head) + one fragment per ~3 blocks."""
    return 1 + math.ceil(num_blocks / BLOCKS_PER_FRAGMENT) if num_blocks else 1


def validate_fragment_count(num_fragments: int, num_blocks: int) -> None:
    """Raise ValueError unless every fragment can hold at least one block."""
    if num_fragments < 1:
        raise ValueError(f"fragments must be at least 1, got {num_fragments}")
    if num_fragments - 1 > num_blocks:
        raise ValueError(
            f"{num_fragments} fragments need at least {num_fragments - 1} transformer blocks "
            f"(fragment 0 holds the embeddings), but the model has {num_blocks}; "
            f"use at most {num_blocks + 1} fragments"
        )


def block_fragment(block: int, num_blocks: int, num_fragments: int, layout: str) -> int:
    """The fragment that transformer block ``block`` belongs to."""
    if num_fragments == 1:
        return 0
    groups = num_fragments - 1
    if layout == "strided":
        return 1 + block % groups
    if layout == "sequential":
        return 1 + block * groups // num_blocks
    raise ValueError(f"unknown fragment layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def partition(
    model: nn.Module, blocks: Sequence[nn.Module], num_fragments: int, layout: str = "strided"
) -> list[Fragment]:
    """Split ``model``'s parameters into fragments; ``blocks`` are its transformer blocks.

    Works for any model: parameters outside ``blocks`` go to fragment 0. Shared (tied)
    parameters are counted once, in the first fragment that meets them.
    """
    validate_fragment_count(num_fragments, len(blocks))
    owner: dict[int, int] = {}
    for i, block in enumerate(blocks):
        fragment = block_fragment(i, len(blocks), num_fragments, layout)
        for param in block.parameters():
            owner.setdefault(id(param), fragment)
    names: list[list[str]] = [[] for _ in range(num_fragments)]
    params: list[list[nn.Parameter]] = [[] for _ in range(num_fragments)]
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        fragment = owner.get(id(param), 0)
        names[fragment].append(name)
        params[fragment].append(param)
    return [Fragment(i, tuple(names[i]), tuple(params[i])) for i in range(num_fragments)]


def validate_schedule(inner_steps: int, num_fragments: int) -> None:
    """H must be at least P, or two fragments would share an offset."""
    if inner_steps < 1:
        raise ValueError(f"inner_steps (H) must be at least 1, got {inner_steps}")
    if inner_steps < num_fragments:
        raise ValueError(
            f"inner_steps (H={inner_steps}) must be at least the number of fragments "
            f"(P={num_fragments}) so that each fragment gets its own offset; raise H or lower P"
        )


def offset(fragment: int, num_fragments: int, inner_steps: int) -> int:
    """t_p = ⌊p·H/P⌋."""
    return fragment * inner_steps // num_fragments


def fragments_due(step: int, num_fragments: int, inner_steps: int) -> list[int]:
    """Fragments that sync after inner step ``step`` (steps count from 1)."""
    return [
        p
        for p in range(num_fragments)
        if step > offset(p, num_fragments, inner_steps)
        and (step - offset(p, num_fragments, inner_steps)) % inner_steps == 0
    ]


def round_at(step: int, fragment: int, num_fragments: int, inner_steps: int) -> int:
    """Round index of ``fragment``'s sync at ``step`` (which must be one of its sync steps)."""
    return (step - offset(fragment, num_fragments, inner_steps)) // inner_steps - 1


def sync_step(fragment: int, round_index: int, num_fragments: int, inner_steps: int) -> int:
    """Inverse of :func:`round_at`: the step at which round ``round_index`` is sent."""
    return offset(fragment, num_fragments, inner_steps) + (round_index + 1) * inner_steps


def next_sync_step(step: int, num_fragments: int, inner_steps: int) -> int:
    """The first step after ``step`` at which some fragment syncs."""
    candidates = []
    for p in range(num_fragments):
        t_p = offset(p, num_fragments, inner_steps)
        k = max(1, (step - t_p) // inner_steps + 1)
        candidates.append(t_p + k * inner_steps)
    return min(candidates)


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate parameters into one fp32 CPU vector (a new tensor)."""
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params])


@torch.no_grad()
def assign_flat(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector back into parameters (inverse of :func:`flatten`)."""
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} values, parameters need {total}")
    offset_ = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset_ : offset_ + n].view_as(p))
        offset_ += n
