"""Fragments and the sync schedule (Streaming DiLoCo §2.2), as pure functions.

Every trainable parameter belongs to exactly one of P fragments; a parameter shared by
several modules (tied embedding and head) counts once, in the first fragment that meets it.
:func:`derive_fragments` picks one of three rules, the same on every peer:

* **explicit** — the caller lists each fragment's parameter names (every trainable
  parameter exactly once; :func:`partition_named` checks it);
* **blocks** — where the model has repeated blocks (:func:`find_blocks`: ``blocks``,
  ``model.layers`` of transformers Llama-likes, ``transformer.h`` of GPT-2-likes, ...,
  or else its longest ``nn.ModuleList`` of same-class modules), fragment 0 holds everything
  outside the blocks (embeddings, final norm, output head) and blocks are spread over
  fragments 1..P−1, strided by default (block i → fragment 1 + i mod (P−1)), the paper's
  choice, or in contiguous runs (``sequential``) (:func:`partition`);
* **parameter order** — a model without repeated blocks (:func:`partition_by_order`):
  fragment 0 takes the parameters of its ``nn.Embedding`` modules and of its output
  embeddings (``get_output_embeddings()``, transformers' name for the head), the paper's
  fragment 0 as far as it can be told; the remaining parameters, in ``named_parameters``
  order, are cut into P−1 contiguous runs, the cut that makes the largest run smallest
  (earliest cut on ties). A model with no embedding at all is cut into P runs, the first
  being fragment 0.

P = 1 puts the whole model in fragment 0.

Fragment p syncs at the steps t_p + k·H for k ≥ 1, with offset t_p = ⌊p·H/P⌋, so every
fragment's outer gradient covers exactly H inner steps and some fragment is in flight every
H/P steps. Round r of fragment p is its (r+1)-th sync. Every peer derives the same schedule
from the step counter alone: no agreement is needed to know what to send when.
"""

from __future__ import annotations

import difflib
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


_BLOCK_PATHS = (
    "blocks",
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
    "layers",
    "h",
)
"""Where models keep their repeated blocks: locod's own and our adapter's ``blocks``,
Llama/Mistral/Qwen-likes, GPT-2-likes, GPT-NeoX, OPT, MPT, and bare names."""


def _attribute_path(model: nn.Module, path: str) -> object:
    value: object = model
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _as_blocks(value: object, model_params: set[int]) -> list[nn.Module] | None:
    """``value`` as a list of blocks if it is a non-empty sequence of the model's modules."""
    if not isinstance(value, nn.ModuleList | list | tuple) or not value:
        return None
    blocks = list(value)
    if not all(isinstance(b, nn.Module) for b in blocks):
        return None
    if not any(id(p) in model_params for b in blocks for p in b.parameters()):
        return None
    return blocks


def find_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The model's repeated transformer blocks, in order, or None if it has none.

    Known places first (``blocks``, ``model.layers``, ``transformer.h``, ...: see
    ``_BLOCK_PATHS``), then the longest ``nn.ModuleList`` of at least two modules of one
    class anywhere in the model (the first such list on ties).
    """
    model_params = {id(p) for p in model.parameters()}
    for path in _BLOCK_PATHS:
        blocks = _as_blocks(_attribute_path(model, path), model_params)
        if blocks is not None:
            return blocks
    best: list[nn.Module] | None = None
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) >= 2
            and len({type(child) for child in module}) == 1
            and (best is None or len(module) > len(best))
        ):
            best = _as_blocks(module, model_params) or best
    return best


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter once, in ``named_parameters`` order."""
    seen: set[int] = set()
    params = []
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        params.append((name, param))
    return params


def derive_fragments(
    model: nn.Module,
    num_fragments: int,
    layout: str = "strided",
    *,
    names: Sequence[Sequence[str]] | None = None,
) -> list[Fragment]:
    """The model's fragments by the module's rules: explicit ``names``, else its blocks,
    else parameter order. Every peer calling this on the same model gets the same split."""
    if names is not None:
        if len(names) != num_fragments:
            raise ValueError(
                f"{len(names)} explicit fragments were given but the number of fragments "
                f"is {num_fragments}; make them agree"
            )
        return partition_named(model, names)
    blocks = find_blocks(model)
    if blocks is not None:
        return partition(model, blocks, num_fragments, layout)
    return partition_by_order(model, num_fragments)


def auto_fragments(model: nn.Module) -> int:
    """P for 'auto': one per ~3 blocks plus fragment 0; 1 (DiLoCo) for a model without
    blocks, where nothing says how large a fragment should be: give P to stream it."""
    blocks = find_blocks(model)
    return auto_fragment_count(len(blocks)) if blocks is not None else 1


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


def _fragment_zero_anchors(model: nn.Module) -> set[int]:
    """Parameters the paper puts in fragment 0 that can be told without blocks: embeddings
    (every ``nn.Embedding``) and the output embeddings (a transformers model's head)."""
    anchors = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    # The model itself, or the transformers model inside a wrapper, may name its head.
    for module in model.modules():
        output_embeddings = getattr(module, "get_output_embeddings", None)
        if callable(output_embeddings):
            head = output_embeddings()
            if isinstance(head, nn.Module):
                anchors.update(id(p) for p in head.parameters())
            break
    return anchors


def contiguous_runs(sizes: Sequence[int], runs: int) -> list[int]:
    """Run index of each item when ``sizes`` are cut into ``runs`` non-empty contiguous runs
    so that the largest run's total is as small as possible (cutting as late as the bound
    allows, so earlier runs are the fuller ones). Needs 1 ≤ runs ≤ len(sizes)."""
    if not 1 <= runs <= len(sizes):
        raise ValueError(f"cannot cut {len(sizes)} items into {runs} non-empty runs")

    def runs_needed(cap: int) -> int:
        count, current = 1, 0
        for size in sizes:
            if current and current + size > cap:
                count, current = count + 1, 0
            current += size
        return count

    # Smallest cap that greedy packing fits into ``runs`` runs (greedy packing needs the
    # fewest runs for a given cap, so this is the optimum).
    low, high = max(sizes), sum(sizes)
    while low < high:
        middle = (low + high) // 2
        if runs_needed(middle) <= runs:
            high = middle
        else:
            low = middle + 1
    owner: list[int] = []
    run, current = 0, 0
    for i, size in enumerate(sizes):
        items_left, runs_to_open = len(sizes) - i, runs - 1 - run
        if owner and (current + size > low or items_left == runs_to_open):
            run, current = run + 1, 0
        owner.append(run)
        current += size
    return owner


def partition_by_order(model: nn.Module, num_fragments: int) -> list[Fragment]:
    """Fragments of a model without blocks: embeddings and head in fragment 0, the rest in
    contiguous runs of about equal size (see the module docstring for the rule)."""
    if num_fragments < 1:
        raise ValueError(f"fragments must be at least 1, got {num_fragments}")
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters to split into fragments")
    if num_fragments == 1:
        return [
            Fragment(0, tuple(n for n, _ in params), tuple(p for _, p in params)),
        ]
    anchors = _fragment_zero_anchors(model)
    rest = [(n, p) for n, p in params if id(p) not in anchors]
    runs = num_fragments - 1 if anchors and rest else num_fragments
    if runs > len(rest) or not rest:
        usable = len(rest) + (1 if len(rest) < len(params) else 0)
        raise ValueError(
            f"{num_fragments} fragments need at least {runs} parameters to split by order, "
            f"but the model (no repeated blocks found) has {len(rest)} outside fragment 0; "
            f"use at most {max(1, usable)} fragments"
        )
    first = num_fragments - runs  # 1 when fragment 0 holds the anchors, else 0
    owner = {
        id(p): first + run
        for (_, p), run in zip(
            rest, contiguous_runs([p.numel() for _, p in rest], runs), strict=True
        )
    }
    names: list[list[str]] = [[] for _ in range(num_fragments)]
    tensors: list[list[nn.Parameter]] = [[] for _ in range(num_fragments)]
    for name, param in params:
        fragment = owner.get(id(param), 0)
        names[fragment].append(name)
        tensors[fragment].append(param)
    return [Fragment(i, tuple(names[i]), tuple(tensors[i])) for i in range(num_fragments)]


def partition_named(model: nn.Module, names: Sequence[Sequence[str]]) -> list[Fragment]:
    """Fragments given by name: ``names[p]`` lists fragment p's parameters.

    Every trainable parameter must be listed exactly once; a tied parameter may be listed
    under any of its names, once. A ValueError names every problem found (up to a few of
    each kind): unknown names, frozen parameters, parameters listed twice or not at all,
    empty fragments.
    """
    if not names:
        raise ValueError("explicit fragments: give at least one fragment")
    by_name = dict(model.named_parameters(remove_duplicate=False))
    trainable = _trainable(model)
    canonical = {id(p): n for n, p in trainable}
    problems: list[str] = []
    placed: dict[int, int] = {}
    fragments: list[list[tuple[str, nn.Parameter]]] = []
    for index, listed in enumerate(names):
        if isinstance(listed, str):
            raise ValueError(f"explicit fragment {index} must be a list of names, not a string")
        members: list[tuple[str, nn.Parameter]] = []
        if not listed:
            problems.append(f"fragment {index} is empty")
        for name in listed:
            param = by_name.get(name)
            if param is None:
                close = difflib.get_close_matches(name, list(by_name), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{name!r} in fragment {index} is not a parameter{hint}")
            elif not param.requires_grad:
                problems.append(f"{name!r} in fragment {index} is frozen (requires_grad=False)")
            elif id(param) in placed:
                problems.append(
                    f"{name!r} in fragment {index} is already in fragment {placed[id(param)]}"
                    + ("" if canonical[id(param)] == name else f" as {canonical[id(param)]!r}")
                )
            else:
                placed[id(param)] = index
                members.append((canonical[id(param)], param))
        fragments.append(members)
    missing = [n for n, p in trainable if id(p) not in placed]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.append(f"not in any fragment: {shown}{more}")
    if problems:
        shown_problems = problems[:10]
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            "explicit fragments must list every trainable parameter exactly once:\n  "
            + "\n  ".join(shown_problems)
            + more
        )
    # Keep the model's parameter order within a fragment: flatten() and every peer agree.
    order = {id(p): i for i, (_, p) in enumerate(trainable)}
    result = []
    for index, members in enumerate(fragments):
        members.sort(key=lambda item: order[id(item[1])])
        result.append(Fragment(index, tuple(n for n, _ in members), tuple(p for _, p in members)))
    return result


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
    """Concatenate parameters into one fp32 CPU vector (a new tensor).

    Parameters on an accelerator are concatenated there first and come over in one copy
    into pinned host memory (one transfer per fragment, not one per tensor); training
    waits for that copy only, never for the outer step that follows on the CPU.
    """
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    device = params[0].device
    if device.type != "cuda" or any(p.device != device for p in params):
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params])
    on_device = torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params])
    host = torch.empty(on_device.numel(), dtype=torch.float32, pin_memory=True)
    host.copy_(on_device, non_blocking=True)
    torch.cuda.current_stream(device).synchronize()
    return host


@torch.no_grad()
def assign_flat(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector back into parameters (inverse of :func:`flatten`).

    For parameters on an accelerator the vector goes over once, from pinned memory and
    without blocking the host: the copies into the parameters are ordered after it on
    the same stream, so the next inner step sees them.
    """
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} values, parameters need {total}")
    if params and params[0].device.type == "cuda" and flat.device.type == "cpu":
        source = flat if flat.is_pinned() else flat.pin_memory()
        flat = source.to(params[0].device, non_blocking=True)
    offset_ = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[offset_ : offset_ + n].view_as(p))
        offset_ += n
