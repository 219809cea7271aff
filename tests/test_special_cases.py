"""DESIGN §1's special cases, each against an independent reference, with the fp32 wire.

* P = 1, τ = 0, α = 0 is DiLoCo;
* on top of that, H = 1 with inner SGD and outer SGD lr 1 without momentum is synchronous
  data-parallel SGD over the M peers' combined batch;
* M = 1, τ = 0, α = 0 with outer SGD lr 1 without momentum is plain local training.
"""

from __future__ import annotations

import copy

import torch
from helpers import random_text_corpus

from locod.peer.codec import WireFormat
from locod.peer.config import OuterConfig
from locod.peer.data import BatchSampler
from locod.peer.fragments import assign_flat, flatten, fragments_due, partition
from locod.peer.inner import InnerConfig, InnerTrainer
from locod.peer.model import ByteTransformer, build_model, model_config
from locod.peer.simulator import InMemoryHub
from locod.peer.streaming import StreamingDiLoCo

CPU = torch.device("cpu")
FP32 = WireFormat(codec="fp32", zstd_level=0)


def _samplers(peers: int, inner: InnerConfig) -> list[BatchSampler]:
    corpus = random_text_corpus()
    return [
        BatchSampler(corpus.train, batch_size=inner.batch_size, seq_len=inner.seq_len, seed=m)
        for m in range(peers)
    ]


def _run_streaming(
    peers: int, steps: int, inner: InnerConfig, outer: OuterConfig
) -> tuple[list[InnerTrainer], list[StreamingDiLoCo]]:
    """M peers of the real algorithm code over the in-memory hub, in lock step."""
    samplers = _samplers(peers, inner)
    hub = InMemoryHub(peers, outer.wire, seed=0)
    trainers, workers = [], []
    for m in range(peers):
        trainer = InnerTrainer(build_model(model_config("tiny"), seed=7), inner, device=CPU)
        fragments = partition(trainer.model, list(trainer.model.blocks), outer.fragments)
        trainers.append(trainer)
        workers.append(StreamingDiLoCo(fragments, outer, hub.averager(m)))
    for step in range(1, steps + 1):
        for trainer, worker, sampler in zip(trainers, workers, samplers, strict=True):
            trainer.train_step(*sampler.next())
            worker.add_tokens(inner.tokens_per_step)
        for worker in workers:
            worker.prepare(step)
        for worker in workers:
            worker.perform(step)
    return trainers, workers


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-6) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_p1_tau0_alpha0_is_diloco() -> None:
    inner = InnerConfig(batch_size=2, seq_len=16, warmup_steps=2, lr=1e-3)
    # H·batch·seq = 128 tokens: a power-of-two weight keeps the weighted mean exact, so the
    # comparison below can be tight.
    outer = OuterConfig(
        inner_steps=4,
        fragments=1,
        overlap=0,
        alpha=0.0,
        outer_lr=0.7,
        outer_momentum=0.9,
        wire=FP32,
    )
    peers, steps = 2, 12
    trainers, workers = _run_streaming(peers, steps, inner, outer)

    # Reference: DiLoCo as in its paper, with torch's own Nesterov SGD as outer optimizer.
    samplers = _samplers(peers, inner)
    replicas = [
        InnerTrainer(build_model(model_config("tiny"), seed=7), inner, device=CPU)
        for _ in range(peers)
    ]
    global_model: ByteTransformer = copy.deepcopy(replicas[0].model)
    outer_opt = torch.optim.SGD(global_model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    for step in range(1, steps + 1):
        for replica, sampler in zip(replicas, samplers, strict=True):
            replica.train_step(*sampler.next())
        if step % 4 == 0:
            for g, *locals_ in zip(
                global_model.parameters(), *(r.model.parameters() for r in replicas), strict=True
            ):
                g.grad = torch.stack([g.detach() - p.detach() for p in locals_]).mean(0)
            outer_opt.step()
            for replica in replicas:
                replica.model.load_state_dict(global_model.state_dict())

    _assert_close(_params(trainers[0].model), _params(global_model))
    _assert_close(_params(trainers[1].model), _params(global_model))
    assert workers[0].stats.rounds_applied == 3
    assert workers[0].global_hash(0) == workers[1].global_hash(0)


def test_h1_inner_sgd_outer_lr1_is_data_parallel_sgd() -> None:
    inner = InnerConfig(
        optimizer="sgd",
        lr=0.05,
        warmup_steps=0,
        weight_decay=0.0,
        grad_clip=0.0,
        batch_size=2,
        seq_len=16,
    )
    outer = OuterConfig(
        inner_steps=1,
        fragments=1,
        overlap=0,
        alpha=0.0,
        outer_lr=1.0,
        outer_momentum=0.0,
        wire=FP32,
    )
    peers, steps = 3, 5
    trainers, _ = _run_streaming(peers, steps, inner, outer)

    # Reference: one model, SGD on the peers' batches concatenated (equal sizes, so the mean
    # loss over the combined batch is the mean of the peers' losses).
    samplers = _samplers(peers, inner)
    model = build_model(model_config("tiny"), seed=7)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        batches = [s.next() for s in samplers]
        inputs = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
        sgd.zero_grad()
        model.loss(inputs, targets).backward()
        sgd.step()
    for trainer in trainers:
        _assert_close(_params(trainer.model), _params(model), atol=2e-6)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 at |x| (the gap to the next representable value up)."""
    magnitude = x.abs()
    return torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude


def test_single_peer_tau0_alpha0_outer_lr1_is_local_training() -> None:
    """M = 1, τ = 0, α = 0, outer SGD lr 1 without momentum: θ_g ← θ_g − (θ_g − θ) = θ.

    In exact arithmetic a sync changes nothing. In fp32 it is one round trip,
    θ ← fl(θ_g − fl(θ_g − θ)), which is off from θ by at most half an ulp of the
    difference plus half an ulp of the result on some values; AdamW then amplifies such
    differences chaotically, by how much depending on the CPU's kernels. So the reference
    is local training that performs that same round trip at every sync (elementwise IEEE
    subtractions, correctly rounded on any CPU): the algorithm must match it bit for bit,
    and each sync must stay within the round trip's error bound of plain local training.
    """
    inner = InnerConfig(batch_size=2, seq_len=16, warmup_steps=2, lr=1e-3)
    outer = OuterConfig(
        inner_steps=6,
        fragments=3,
        overlap=0,
        alpha=0.0,
        outer_lr=1.0,
        outer_momentum=0.0,
        wire=FP32,
    )
    steps = 18
    trainers, workers = _run_streaming(1, steps, inner, outer)
    assert workers[0].stats.rounds_applied == 7  # fragments 0,1,2 sync 3,2,2 times

    sampler = _samplers(1, inner)[0]
    local = InnerTrainer(build_model(model_config("tiny"), seed=7), inner, device=CPU)
    fragments = partition(local.model, list(local.model.blocks), outer.fragments)
    global_copy = [flatten(f.params) for f in fragments]
    syncs = 0
    for step in range(1, steps + 1):
        local.train_step(*sampler.next())
        for p in fragments_due(step, outer.fragments, outer.inner_steps):
            theta = flatten(fragments[p].params)
            delta = global_copy[p] - theta
            synced = global_copy[p] - delta
            bound = 0.5 * (_ulp(delta) + _ulp(synced))
            assert bool(((synced - theta).abs() <= bound).all()), f"sync of {p} at {step}"
            global_copy[p] = synced
            assign_flat(fragments[p].params, synced)
            syncs += 1
    assert syncs == 7
    _assert_close(_params(trainers[0].model), _params(local.model), atol=0.0)
