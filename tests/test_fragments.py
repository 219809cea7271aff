"""Fragments partition the parameters; the schedule is a pure function of the step."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from locod.peer.fragments import (
    assign_flat,
    auto_fragment_count,
    block_fragment,
    flatten,
    fragments_due,
    offset,
    partition,
    round_at,
    sync_step,
    validate_schedule,
)
from locod.peer.model import build_model, model_config


@pytest.mark.parametrize("num_fragments", [1, 2, 3, 5])
@pytest.mark.parametrize("layout", ["strided", "sequential"])
def test_every_parameter_is_in_exactly_one_fragment(num_fragments: int, layout: str) -> None:
    model = build_model(model_config("tiny"), seed=0)
    fragments = partition(model, list(model.blocks), num_fragments, layout)
    assert len(fragments) == num_fragments
    ids = [id(p) for f in fragments for p in f.params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert sum(f.numel for f in fragments) == sum(p.numel() for p in model.parameters())
    assert all(f.params for f in fragments)
    # Fragment 0 holds the embeddings, final norm and head, and no block.
    names0 = set(fragments[0].names)
    assert {"token_embedding.weight", "head.weight", "final_norm.weight"} <= names0
    if num_fragments > 1:
        assert not any(name.startswith("blocks.") for name in names0)


def test_strided_and_sequential_layouts_match_the_paper() -> None:
    # 6 blocks over fragments 1..2: strided 1,2,1,2,1,2; sequential 1,1,1,2,2,2.
    assert [block_fragment(i, 6, 3, "strided") for i in range(6)] == [1, 2, 1, 2, 1, 2]
    assert [block_fragment(i, 6, 3, "sequential") for i in range(6)] == [1, 1, 1, 2, 2, 2]
    assert auto_fragment_count(6) == 3
    assert auto_fragment_count(24) == 9


def test_any_model_with_a_list_of_blocks_can_be_fragmented() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight  # tied: must be counted once

    model = Tied()
    fragments = partition(model, list(model.layers), 3, "strided")
    ids = [id(p) for f in fragments for p in f.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert fragments[1].names == (
        "layers.0.weight",
        "layers.0.bias",
        "layers.2.weight",
        "layers.2.bias",
    )


def test_too_many_fragments_is_a_clear_error() -> None:
    model = build_model(model_config("tiny"), seed=0)
    with pytest.raises(ValueError, match="at most 5 fragments"):
        partition(model, list(model.blocks), 6)


@pytest.mark.parametrize(
    ("inner_steps", "num_fragments"), [(1, 1), (10, 1), (12, 4), (100, 3), (7, 7), (30, 4)]
)
def test_each_fragment_syncs_every_h_steps_at_its_offset(
    inner_steps: int, num_fragments: int
) -> None:
    validate_schedule(inner_steps, num_fragments)
    horizon = 5 * inner_steps + 3
    sends: dict[int, list[int]] = {p: [] for p in range(num_fragments)}
    for step in range(1, horizon + 1):
        for p in fragments_due(step, num_fragments, inner_steps):
            assert round_at(step, p, num_fragments, inner_steps) == len(sends[p])
            assert sync_step(p, len(sends[p]), num_fragments, inner_steps) == step
            sends[p].append(step)
    offsets = [offset(p, num_fragments, inner_steps) for p in range(num_fragments)]
    assert offsets == [p * inner_steps // num_fragments for p in range(num_fragments)]
    assert len(set(offsets)) == num_fragments
    for p, steps in sends.items():
        assert steps[0] == offsets[p] + inner_steps
        assert all(b - a == inner_steps for a, b in itertools.pairwise(steps))
        assert steps == list(range(offsets[p] + inner_steps, horizon + 1, inner_steps))


def test_schedule_spreads_fragments_evenly() -> None:
    # H = 100, P = 4: some fragment is in flight every 25 steps.
    due = [s for s in range(1, 401) if fragments_due(s, 4, 100)]
    assert due == list(range(100, 401, 25))


def test_schedule_rejects_h_below_p() -> None:
    with pytest.raises(ValueError, match="at least the number of fragments"):
        validate_schedule(3, 4)


def test_flatten_and_assign_round_trip() -> None:
    params = [torch.randn(3, 2), torch.randn(5)]
    flat = flatten(params)
    assert flat.shape == (11,)
    targets = [torch.zeros(3, 2), torch.zeros(5)]
    assign_flat(targets, flat)
    assert all(torch.equal(a, b) for a, b in zip(params, targets, strict=True))
    with pytest.raises(ValueError, match="values"):
        assign_flat(targets, torch.zeros(10))
