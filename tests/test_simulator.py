"""peer.simulator: ddp, DiLoCo and Streaming DiLoCo side by side, and what they cost."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from helpers import SIMULATION_RESULT_KEYS, random_text_corpus

from locod.peer.averaging import SyncFailed, SyncRequest, SyncResult
from locod.peer.codec import WireFormat, encode
from locod.peer.config import OuterConfig
from locod.peer.data import BatchSampler, Corpus
from locod.peer.fragments import partition
from locod.peer.inner import InnerConfig, InnerTrainer
from locod.peer.model import build_model, count_parameters, model_config
from locod.peer.simulator import METHODS, InMemoryHub, SimulationConfig, SimulationResult, simulate
from locod.peer.streaming import StreamingDiLoCo

CPU = torch.device("cpu")
FP32 = WireFormat(codec="fp32", zstd_level=0)
STEPS, PEERS, BATCH, SEQ, H = 24, 2, 2, 32, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return random_text_corpus()


def _config(method: str, **overrides: Any) -> SimulationConfig:
    settings: dict[str, Any] = {
        "method": method,
        "peers": PEERS,
        "steps": STEPS,
        "model": "tiny",
        "eval_batches": 2,
        "inner": InnerConfig(lr=3e-3, warmup_steps=3, batch_size=BATCH, seq_len=SEQ),
        "outer": OuterConfig(inner_steps=H, wire=FP32),
    }
    settings.update(overrides)
    return SimulationConfig(**settings)


@pytest.fixture(scope="module")
def runs(corpus: Corpus) -> dict[str, SimulationResult]:
    """One short run of each method, shared by the tests that only read results."""
    return {method: simulate(_config(method), corpus) for method in METHODS}


def _fp32_bytes(numel: int) -> int:
    """Size of one fp32, uncompressed payload of ``numel`` values, from the real codec."""
    return len(encode(torch.zeros(numel), FP32))


def _without_wall_time(result: SimulationResult) -> dict[str, object]:
    fields = result.as_json()
    del fields["wall_s"]
    return fields


# -- what a run reports --------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_run_reports_every_field(runs: dict[str, SimulationResult], method: str) -> None:
    result = runs[method]
    fields = result.as_json()
    assert set(fields) == SIMULATION_RESULT_KEYS
    assert json.loads(json.dumps(fields))["method"] == method
    assert (result.method, result.peers, result.steps, result.model) == (
        method,
        PEERS,
        STEPS,
        "tiny",
    )
    assert result.tokens == STEPS * PEERS * BATCH * SEQ
    assert result.parameters == count_parameters(build_model(model_config("tiny"), seed=0))
    assert result.wire == "fp32"
    assert result.eval_loss == result.eval_curve[-1][1]
    assert [step for step, _ in result.eval_curve] == [4, 8, 12, 16, 20, 24]  # steps // 5
    assert result.wall_s >= 0 and result.rounds > 0
    assert result.bytes_sent_per_peer > 0 and result.peak_bytes_per_sync > 0


def test_each_method_reports_its_own_algorithm(runs: dict[str, SimulationResult]) -> None:
    ddp, diloco, streaming = runs["ddp"], runs["diloco"], runs["streaming"]
    assert (ddp.fragments, ddp.inner_steps, ddp.overlap, ddp.alpha) == (1, 1, 0, 0.0)
    assert ddp.rounds == STEPS
    assert ddp.eval_loss_replicas is None and ddp.eval_loss_replica_average is None
    # The config asked for τ = 1, α = 0.5 and auto fragments: DiLoCo overrides all three.
    assert (diloco.fragments, diloco.inner_steps, diloco.overlap, diloco.alpha) == (1, H, 0, 0.0)
    assert diloco.rounds == STEPS // H
    # tiny has 4 blocks: one fragment for the embeddings and one per ~3 blocks.
    assert (streaming.fragments, streaming.inner_steps, streaming.overlap, streaming.alpha) == (
        3,
        H,
        1,
        0.5,
    )
    for result in (diloco, streaming):
        assert isinstance(result.eval_loss_replicas, float)
        assert isinstance(result.eval_loss_replica_average, float)


@pytest.mark.parametrize("method", METHODS)
def test_the_loss_goes_down(runs: dict[str, SimulationResult], method: str) -> None:
    result = runs[method]
    first, last = result.eval_curve[0][1], result.eval_curve[-1][1]
    assert first > last
    assert result.eval_loss < math.log(256) - 1.5
    assert result.train_loss < math.log(256) - 1.5


@pytest.mark.parametrize("method", METHODS)
def test_a_seed_fixes_the_run(
    runs: dict[str, SimulationResult], corpus: Corpus, method: str
) -> None:
    again = simulate(_config(method), corpus)
    assert _without_wall_time(again) == _without_wall_time(runs[method])


def test_another_seed_gives_another_run(runs: dict[str, SimulationResult], corpus: Corpus) -> None:
    other = simulate(_config("streaming", seed=1, steps=6), corpus)
    same = simulate(_config("streaming", steps=6), corpus)
    assert other.eval_curve != same.eval_curve


def test_progress_lines_report_each_evaluation(corpus: Corpus) -> None:
    lines: list[str] = []
    simulate(_config("streaming", steps=4, eval_every=2), corpus, progress=lines.append)
    assert len(lines) == 2
    assert lines[0].startswith("streaming step 2/4") and lines[1].startswith("streaming step 4/4")
    assert "MB sent/peer" in lines[-1]


# -- traffic --------------------------------------------------------------------------------


def test_ddp_sends_a_full_fp32_gradient_all_reduce_every_step(
    runs: dict[str, SimulationResult],
) -> None:
    ddp = runs["ddp"]
    per_step = 2 * (PEERS - 1) / PEERS * 4 * ddp.parameters
    assert ddp.bytes_sent_per_peer == STEPS * per_step
    assert ddp.peak_bytes_per_sync == per_step


def test_ddp_over_bf16_sends_half(corpus: Corpus) -> None:
    peers, steps = 3, 2
    bf16 = simulate(
        _config(
            "ddp",
            peers=peers,
            steps=steps,
            outer=OuterConfig(inner_steps=H, wire=WireFormat(codec="bf16")),
        ),
        corpus,
    )
    fp32 = simulate(_config("ddp", peers=peers, steps=steps), corpus)
    assert bf16.bytes_sent_per_peer == steps * 2 * (peers - 1) / peers * 2 * bf16.parameters
    assert bf16.bytes_sent_per_peer == fp32.bytes_sent_per_peer / 2


def test_streaming_peak_is_one_fragment_not_the_model(runs: dict[str, SimulationResult]) -> None:
    share = 2 * (PEERS - 1) / PEERS
    model = build_model(model_config("tiny"), seed=0)
    fragments = partition(model, list(model.blocks), runs["streaming"].fragments)
    largest = max(f.numel for f in fragments)
    assert runs["streaming"].peak_bytes_per_sync == share * _fp32_bytes(largest)
    # DiLoCo syncs the whole model at once: that is what streaming avoids.
    whole = share * _fp32_bytes(count_parameters(model))
    assert runs["diloco"].peak_bytes_per_sync == whole
    assert runs["streaming"].peak_bytes_per_sync < 0.5 * whole


def test_outer_traffic_is_the_sum_of_the_rounds(runs: dict[str, SimulationResult]) -> None:
    # DiLoCo, fp32, no compression: every round costs the same, the whole model.
    diloco = runs["diloco"]
    share = 2 * (PEERS - 1) / PEERS
    assert diloco.bytes_sent_per_peer == diloco.rounds * share * _fp32_bytes(diloco.parameters)


@pytest.mark.parametrize("method", METHODS)
def test_a_single_peer_sends_nothing(corpus: Corpus, method: str) -> None:
    result = simulate(_config(method, peers=1, steps=H), corpus)
    assert result.bytes_sent_per_peer == 0
    assert result.peak_bytes_per_sync == 0
    assert result.tokens == H * BATCH * SEQ


# -- the in-memory hub ------------------------------------------------------------------------


def _request(fragment: int, delta: list[float], weight: float) -> SyncRequest:
    return SyncRequest(
        fragment=fragment, round=0, step=5, delta=torch.tensor(delta), weight=weight, global_hash=""
    )


def test_hub_reduces_a_round_once_every_peer_contributed() -> None:
    hub = InMemoryHub(2, FP32, seed=0)
    a, b = hub.averager(0), hub.averager(1)
    a.start(_request(0, [1.0, 2.0], weight=1.0))
    assert a.result(0, 0, timeout_s=0.0) is None
    assert isinstance(a.result(0, 0, timeout_s=1.0), SyncFailed)  # nobody else is coming
    b.start(_request(0, [4.0, -4.0], weight=3.0))
    outcome_a, outcome_b = a.result(0, 0, timeout_s=0.0), b.result(0, 0, timeout_s=0.0)
    assert isinstance(outcome_a, SyncResult) and isinstance(outcome_b, SyncResult)
    assert outcome_a.mean is not None and outcome_b.mean is not None
    # Weighted by tokens: (1·[1, 2] + 3·[4, −4]) / 4.
    assert outcome_a.mean.tolist() == [3.25, -2.5] == outcome_b.mean.tolist()
    assert outcome_a.group_size == 2
    assert hub.rounds == 1
    # Each peer sends half its contribution and serves half the mean: one payload in all.
    assert hub.bytes_sent == [_fp32_bytes(2), _fp32_bytes(2)]
    assert dict(hub.bytes_at_step) == {5: _fp32_bytes(2)}


def test_every_peer_holds_the_same_outer_parameters_after_every_round(corpus: Corpus) -> None:
    """Invariant I1 in the simulator, with the lossy wire and stochastic rounding."""
    peers, steps = 3, 16
    inner = InnerConfig(lr=3e-3, warmup_steps=2, batch_size=BATCH, seq_len=SEQ)
    outer = OuterConfig(
        inner_steps=4, fragments=3, overlap=1, wire=WireFormat(codec="fp4", rounding="stochastic")
    )
    hub = InMemoryHub(peers, outer.wire, seed=0)
    trainers, workers, samplers = [], [], []
    for m in range(peers):
        trainer = InnerTrainer(build_model(model_config("tiny"), seed=0), inner, device=CPU)
        fragments = partition(trainer.model, list(trainer.model.blocks), outer.fragments)
        trainers.append(trainer)
        workers.append(StreamingDiLoCo(fragments, outer, hub.averager(m)))
        samplers.append(BatchSampler(corpus.train, batch_size=BATCH, seq_len=SEQ, seed=m))
    initial = [workers[0].global_hash(p) for p in range(outer.fragments)]

    applied_rounds = 0
    for step in range(1, steps + 1):
        for trainer, worker, sampler in zip(trainers, workers, samplers, strict=True):
            trainer.train_step(*sampler.next())
            worker.add_tokens(inner.tokens_per_step)
        for worker in workers:
            worker.prepare(step)
        applied = [worker.perform(step) for worker in workers]
        assert all(fragments == applied[0] for fragments in applied)
        applied_rounds += len(applied[0])
        for p in range(outer.fragments):
            hashes = {worker.global_hash(p) for worker in workers}
            assert len(hashes) == 1, f"θ_g[{p}] differs between peers after step {step}"

    # Fragments 0, 1, 2 sent 4, 3, 3 rounds; the one sent at step 16 lands at step 17 (τ = 1).
    assert hub.rounds == 10 and applied_rounds == 9
    assert all(workers[0].global_hash(p) != initial[p] for p in range(outer.fragments))
    # The replicas trained on their own data: θ differs even though θ_g agrees.
    first, second = (t.model.head.weight for t in trainers[:2])
    assert not torch.equal(first, second)


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"method": "fsdp"}, "method must be one of ddp, diloco, streaming, got 'fsdp'"),
        ({"peers": 0}, "peers must be at least 1, got 0"),
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"eval_batches": 0}, "eval_batches at least 1"),
        ({"eval_every": -1}, "eval_every must be 0 or more"),
        ({"model": "huge"}, "unknown model preset 'huge'; choose one of tiny, small, base, 1b"),
        (
            {"method": "ddp", "outer": OuterConfig(wire=WireFormat(codec="fp4"))},
            "use --wire fp32 or --wire bf16 with --method ddp",
        ),
        ({"device": "toaster"}, "device 'toaster' is not a torch device"),
    ],
)
def test_invalid_simulation_config_says_why(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _config(str(override.pop("method", "streaming")), **override)


def test_a_cuda_device_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda:0' is not available here"):
        _config("streaming", device="cuda:0")


def test_a_sequence_longer_than_the_model_is_refused(corpus: Corpus) -> None:
    cfg = _config("streaming", inner=InnerConfig(batch_size=BATCH, seq_len=300))
    with pytest.raises(ValueError, match="seq_len 300 exceeds model tiny's max of 256"):
        simulate(cfg, corpus)


def test_too_many_fragments_for_the_model_is_refused(corpus: Corpus) -> None:
    cfg = _config("streaming", outer=OuterConfig(inner_steps=H, fragments=6, wire=FP32))
    with pytest.raises(ValueError, match="use at most 5 fragments"):
        simulate(cfg, corpus)
