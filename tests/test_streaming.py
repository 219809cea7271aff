"""The outer loop's timing rules: τ, late results, failures, repair, token weights, waits."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from locod.peer.averaging import FragmentState, SyncFailed, SyncOutcome, SyncRequest, SyncResult
from locod.peer.codec import WireFormat
from locod.peer.config import OuterConfig
from locod.peer.fragments import Fragment, flatten
from locod.peer.streaming import StreamingDiLoCo


@dataclass
class ScriptedAverager:
    """An averager whose answers the test decides; records what it was asked."""

    answers: dict[tuple[int, int], SyncOutcome] = field(default_factory=dict)
    started: list[SyncRequest] = field(default_factory=list)
    asked: list[tuple[int, int, float]] = field(default_factory=list)
    abandoned: list[tuple[int, int]] = field(default_factory=list)
    clock: list[float] = field(default_factory=lambda: [0.0])

    def start(self, request: SyncRequest) -> None:
        self.started.append(request)

    def result(self, fragment: int, round_index: int, timeout_s: float) -> SyncOutcome | None:
        self.asked.append((fragment, round_index, timeout_s))
        answer = self.answers.get((fragment, round_index))
        if answer is None:
            self.clock[0] += timeout_s  # a blocking wait that found nothing
        return answer

    def abandon(self, fragment: int, round_index: int) -> None:
        self.abandoned.append((fragment, round_index))


def _worker(
    averager: ScriptedAverager, **overrides: object
) -> tuple[StreamingDiLoCo, nn.Parameter]:
    param = nn.Parameter(torch.tensor([1.0, 2.0]))
    settings: dict[str, object] = {
        "inner_steps": 4,
        "fragments": 1,
        "overlap": 2,
        "alpha": 0.5,
        "outer_lr": 1.0,
        "outer_momentum": 0.0,
        "wire": WireFormat(codec="fp32", zstd_level=0),
        "late_wait_s": 5.0,
    }
    settings.update(overrides)
    cfg = OuterConfig(**settings)  # type: ignore[arg-type]
    worker = StreamingDiLoCo(
        [Fragment(0, ("w",), (param,))], cfg, averager, clock=lambda: averager.clock[0]
    )
    return worker, param


def _train(param: nn.Parameter, value: list[float]) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(value))


def test_result_is_applied_exactly_tau_steps_after_sending() -> None:
    averager = ScriptedAverager()
    worker, param = _worker(averager)
    for _ in range(4):
        worker.add_tokens(10)
    _train(param, [0.0, 0.0])  # Δ = θ_g − θ = [1, 2]
    assert worker.prepare(4) == [0]
    request = averager.started[0]
    assert (request.fragment, request.round, request.weight) == (0, 0, 40.0)
    assert request.delta.tolist() == [1.0, 2.0]
    averager.answers[(0, 0)] = SyncResult(mean=torch.tensor([0.5, 1.0]), group_size=2)
    _train(param, [-1.0, -1.0])
    assert worker.perform(4) == []
    assert worker.perform(5) == []
    assert param.tolist() == [-1.0, -1.0] and averager.asked == []
    assert worker.perform(6) == [0]
    # θ_g = [1, 2] − 1·[0.5, 1] = [0.5, 1]; θ = 0.5·[−1, −1] + 0.5·[0.5, 1] = [−0.25, 0]
    assert worker.global_params[0].tolist() == [0.5, 1.0]
    assert param.tolist() == [-0.25, 0.0]
    assert worker.stats.last[0].group_size == 2


def test_late_result_waits_the_bound_then_applies_when_it_comes() -> None:
    averager = ScriptedAverager()
    worker, _ = _worker(averager, late_policy="apply")
    worker.add_tokens(1)
    worker.prepare(4)
    assert worker.perform(6) == []
    assert averager.asked == [(0, 0, 5.0)]
    assert worker.stats.wait_s == pytest.approx(5.0)
    assert worker.perform(7) == []  # only looks, no second blocking wait
    assert averager.asked[-1] == (0, 0, 0.0)
    averager.answers[(0, 0)] = SyncResult(mean=torch.tensor([0.0, 0.0]), group_size=1)
    assert worker.perform(8) == [0]
    assert worker.stats.rounds_applied == 1
    assert worker.stats.wait_s == pytest.approx(5.0)


def test_late_result_is_skipped_under_skip_policy_and_its_tokens_kept() -> None:
    averager = ScriptedAverager()
    worker, _ = _worker(averager, late_policy="skip")
    for _ in range(4):
        worker.add_tokens(10)
    worker.prepare(4)
    assert worker.perform(6) == []
    assert averager.abandoned == [(0, 0)]
    assert worker.stats.rounds_skipped == 1
    assert worker.tokens_since[0] == 40.0
    for _ in range(4):
        worker.add_tokens(10)
    worker.prepare(8)
    assert averager.started[-1].weight == 80.0
    assert averager.started[-1].round == 1


def test_outstanding_round_is_resolved_before_the_next_is_sent() -> None:
    averager = ScriptedAverager()
    worker, _ = _worker(averager, late_policy="apply")
    worker.add_tokens(1)
    worker.prepare(4)
    worker.perform(6)  # late
    worker.add_tokens(1)
    worker.prepare(8)  # must give round 0 up (after one more bounded wait) before round 1
    assert averager.abandoned == [(0, 0)]
    assert [r.round for r in averager.started] == [0, 1]


def test_failed_round_changes_nothing() -> None:
    averager = ScriptedAverager()
    worker, param = _worker(averager)
    worker.add_tokens(3)
    _train(param, [0.0, 0.0])
    worker.prepare(4)
    averager.answers[(0, 0)] = SyncFailed("reducer died")
    before = worker.global_params[0].clone()
    worker.perform(6)
    assert torch.equal(worker.global_params[0], before)
    assert param.tolist() == [0.0, 0.0]
    assert worker.stats.rounds_failed == 1
    assert worker.tokens_since[0] == 3.0
    assert worker.stats.last[0].outcome == "failed"


def test_adopted_state_replaces_the_outer_state() -> None:
    averager = ScriptedAverager()
    worker, param = _worker(averager, alpha=0.0)
    worker.add_tokens(1)
    worker.prepare(4)
    state = FragmentState(global_params=torch.tensor([9.0, 9.0]), momentum=torch.tensor([1.0, 1.0]))
    averager.answers[(0, 0)] = SyncResult(mean=None, group_size=3, adopt=state)
    worker.perform(6)
    assert worker.global_params[0].tolist() == [9.0, 9.0]
    assert worker.momentum[0].tolist() == [1.0, 1.0]
    assert param.tolist() == [9.0, 9.0]
    assert worker.stats.repairs == 1


def test_state_dict_round_trip_restores_hashes() -> None:
    averager = ScriptedAverager()
    worker, _ = _worker(averager)
    worker.global_params[0] += 1
    other, _ = _worker(ScriptedAverager())
    other.load_state_dict(worker.state_dict())
    assert other.global_hash(0) == worker.global_hash(0)
    assert flatten(list(other.fragments[0].params)).tolist() == [1.0, 2.0]
