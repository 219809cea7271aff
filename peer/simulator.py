"""M peers in one process: Streaming DiLoCo, DiLoCo and data-parallel side by side.

The simulator runs the same algorithm code as the daemon (:class:`peer.streaming.
StreamingDiLoCo`) against an in-memory averager that does what the network does: every
peer's outer gradient is encoded with the real codec, the reducer decodes the
contributions, averages them in fp32 in member order, encodes the mean once, and every
peer decodes those same bytes. Bytes are counted from the codec's real output.

Traffic accounting is the same for every method: a synchronized tensor costs each peer
(M−1)/M of its own encoded contribution (the parts it sends to the other reducers) plus
(M−1)/M of the encoded mean (the parts it serves as reducer), as in a butterfly all-reduce.
When both have the same size that is the usual 2·(M−1)/M times the encoded size.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from locod.peer.averaging import SyncFailed, SyncOutcome, SyncRequest, SyncResult
from locod.peer.codec import WireFormat, decode, encode
from locod.peer.config import OuterConfig
from locod.peer.data import BatchSampler, Corpus, heldout_batches
from locod.peer.fragments import (
    assign_flat,
    auto_fragments,
    derive_fragments,
    find_blocks,
    flatten,
    validate_fragment_count,
    validate_schedule,
)
from locod.peer.inner import InnerConfig, InnerTrainer, evaluate
from locod.peer.model import CausalLM, build_model, check_model_spec, count_parameters
from locod.peer.outer import bounded_mean
from locod.peer.streaming import StreamingDiLoCo

METHODS = ("ddp", "diloco", "streaming")


@dataclass(kw_only=True, slots=True)
class SimulationConfig:
    """One simulated run."""

    method: str = "streaming"
    """``ddp`` (gradients averaged every step), ``diloco`` or ``streaming``."""
    peers: int = 2
    """M, the number of simulated peers."""
    steps: int = 200
    """Inner steps per peer."""
    model: str = "small"
    """Model spec: a preset (see ``peer.model.MODEL_PRESETS``) or ``hf:PATH``."""
    seed: int = 0
    """Seeds the initial weights (shared) and each peer's data stream (its own)."""
    eval_every: int = 0
    """Evaluate the outer parameters every this many steps; 0 picks about 5 times a run."""
    eval_batches: int = 16
    """Held-out batches per evaluation."""
    final_sync: bool = True
    """Sync every fragment once more at the end so the outer parameters hold all training."""
    device: str = "cpu"
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.peers < 1:
            raise ValueError(f"peers must be at least 1, got {self.peers}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.eval_every < 0 or self.eval_batches < 1:
            raise ValueError("eval_every must be 0 or more and eval_batches at least 1")
        if self.method == "ddp" and self.outer.wire.codec not in ("fp32", "bf16"):
            raise ValueError(
                "ddp averages raw gradients: use --wire fp32 or --wire bf16 with --method ddp"
            )
        check_model_spec(self.model)
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(
                f"device {self.device!r} is not a torch device; use cpu, cuda, cuda:1, ..."
            ) from None
        if device.type == "cuda" and (
            not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
        ):
            raise ValueError(f"device {self.device!r} is not available here; use --device cpu")


@dataclass(slots=True)
class SimulationResult:
    """What a run measured; ``as_json`` is what ``locod simulate --json`` prints."""

    method: str
    peers: int
    steps: int
    model: str
    parameters: int
    fragments: int
    inner_steps: int
    overlap: int
    alpha: float
    wire: str
    tokens: int
    train_loss: float
    eval_loss: float
    eval_loss_replicas: float | None
    eval_loss_replica_average: float | None
    bytes_sent_per_peer: float
    peak_bytes_per_sync: float
    rounds: int
    wall_s: float
    eval_curve: list[tuple[int, float]] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class _Contribution:
    payload: bytes
    weight: float
    step: int


class InMemoryHub:
    """The network of a simulation: collects contributions and reduces complete rounds."""

    def __init__(
        self, peers: int, wire: WireFormat, *, seed: int, clip_factor: float = 0.0
    ) -> None:
        self.peers = peers
        self.clip_factor = clip_factor
        self.wire = wire
        self.seed = seed
        self._contributions: dict[tuple[int, int], dict[int, _Contribution]] = defaultdict(dict)
        self._results: dict[tuple[int, int], SyncOutcome] = {}
        self.bytes_sent = [0.0] * peers
        self.bytes_at_step: dict[int, float] = defaultdict(float)
        """Bytes one peer sent for the syncs started at each step (peer 0's view)."""
        self.rounds = 0

    def averager(self, peer: int) -> InMemoryAverager:
        return InMemoryAverager(self, peer)

    def _generator(self, *key: int) -> torch.Generator | None:
        if self.wire.rounding != "stochastic":
            return None
        mixed = hash((self.seed, *key)) & 0x7FFF_FFFF_FFFF_FFFF
        return torch.Generator().manual_seed(mixed)

    def contribute(self, peer: int, request: SyncRequest) -> None:
        key = (request.fragment, request.round)
        payload = encode(request.delta, self.wire, generator=self._generator(peer, *key))
        self._contributions[key][peer] = _Contribution(payload, request.weight, request.step)
        if len(self._contributions[key]) == self.peers:
            self._reduce(key)

    def _reduce(self, key: tuple[int, int]) -> None:
        members = sorted(self._contributions[key])
        contributions = self._contributions.pop(key)
        numel = None
        decoded = []
        for peer in members:
            delta = decode(contributions[peer].payload, expected_numel=numel)
            numel = delta.numel()
            decoded.append((delta, contributions[peer].weight))
        mean_payload = encode(
            bounded_mean(decoded, self.clip_factor)[0],
            self.wire,
            generator=self._generator(-1, *key),
        )
        mean = decode(mean_payload)
        share = (self.peers - 1) / self.peers
        for peer in members:
            cost = share * (len(contributions[peer].payload) + len(mean_payload))
            self.bytes_sent[peer] += cost
            if peer == 0:
                self.bytes_at_step[contributions[peer].step] += cost
        self._results[key] = SyncResult(mean=mean, group_size=len(members))
        self.rounds += 1

    def result(self, fragment: int, round_index: int) -> SyncOutcome | None:
        return self._results.get((fragment, round_index))


class InMemoryAverager:
    """One peer's view of the :class:`InMemoryHub` (implements ``peer.averaging.Averager``)."""

    def __init__(self, hub: InMemoryHub, peer: int) -> None:
        self.hub = hub
        self.peer = peer

    def start(self, request: SyncRequest) -> None:
        self.hub.contribute(self.peer, request)

    def result(self, fragment: int, round_index: int, timeout_s: float) -> SyncOutcome | None:
        outcome = self.hub.result(fragment, round_index)
        if outcome is None and timeout_s > 0:
            # Lock step: every peer prepared before any performs, so a missing result means
            # a peer never contributed. Waiting would never help in one thread.
            return SyncFailed(f"round ({fragment}, {round_index}) is incomplete in the simulator")
        return outcome

    def abandon(self, fragment: int, round_index: int) -> None:
        return None


def _resolve_outer(cfg: SimulationConfig, model: CausalLM) -> OuterConfig:
    outer = copy.copy(cfg.outer)
    if cfg.method == "diloco":
        # DiLoCo is Streaming DiLoCo with P = 1, τ = 0, α = 0 (DESIGN §1), whatever the
        # outer config says; the CLI refuses flags that contradict this.
        outer.fragments, outer.overlap, outer.alpha = 1, 0, 0.0
    elif outer.fragments == 0:
        outer.fragments = auto_fragments(model)
    blocks = find_blocks(model)
    if blocks is not None:
        validate_fragment_count(outer.fragments, len(blocks))
    validate_schedule(outer.inner_steps, outer.fragments)
    return outer


def simulate(
    cfg: SimulationConfig, corpus: Corpus, *, progress: Callable[[str], None] = lambda _line: None
) -> SimulationResult:
    """Run ``cfg.peers`` peers for ``cfg.steps`` inner steps and measure the result."""
    device = torch.device(cfg.device)
    # Every peer starts from these weights (the same seed on every peer of a real run).
    model = build_model(cfg.model, seed=cfg.seed, vocab_size=corpus.vocab_size)
    if model.max_seq_len is not None and cfg.inner.seq_len > model.max_seq_len:
        raise ValueError(
            f"seq_len {cfg.inner.seq_len} exceeds model {cfg.model}'s max of {model.max_seq_len}"
        )
    eval_set = heldout_batches(
        corpus.heldout,
        batch_size=cfg.inner.batch_size,
        seq_len=cfg.inner.seq_len,
        num_batches=cfg.eval_batches,
    )
    samplers = [
        BatchSampler(
            corpus.train,
            batch_size=cfg.inner.batch_size,
            seq_len=cfg.inner.seq_len,
            seed=cfg.seed * 1_000_003 + peer + 1,
        )
        for peer in range(cfg.peers)
    ]
    eval_every = cfg.eval_every or max(1, cfg.steps // 5)
    started = time.perf_counter()
    if cfg.method == "ddp":
        run = _DataParallelRun(cfg, model, samplers, device)
    else:
        run = _OuterRun(cfg, model, samplers, device)  # type: ignore[assignment]
    curve: list[tuple[int, float]] = []
    train_loss = float("nan")
    tokens = 0
    for step in range(1, cfg.steps + 1):
        train_loss = run.step(step)
        tokens += cfg.peers * cfg.inner.tokens_per_step
        if step % eval_every == 0 or step == cfg.steps:
            if step == cfg.steps:
                run.finish(step)
            loss = evaluate(run.eval_model(), eval_set, device)
            curve.append((step, round(loss, 4)))
            elapsed = time.perf_counter() - started
            progress(
                f"{cfg.method} step {step}/{cfg.steps}  train {train_loss:.3f}  eval {loss:.3f}  "
                f"{tokens / elapsed:,.0f} tok/s  {run.bytes_sent_per_peer() / 1e6:.2f} MB sent/peer"
            )
    replicas, replica_average = run.replica_losses(eval_set)
    return SimulationResult(
        method=cfg.method,
        peers=cfg.peers,
        steps=cfg.steps,
        model=cfg.model,
        parameters=run.parameters,
        fragments=run.num_fragments,
        inner_steps=1 if cfg.method == "ddp" else run.outer_cfg.inner_steps,
        overlap=0 if cfg.method == "ddp" else run.outer_cfg.overlap,
        alpha=0.0 if cfg.method == "ddp" else run.outer_cfg.alpha,
        wire=cfg.outer.wire.codec,
        tokens=tokens,
        train_loss=round(train_loss, 4),
        eval_loss=curve[-1][1],
        eval_loss_replicas=replicas,
        eval_loss_replica_average=replica_average,
        bytes_sent_per_peer=run.bytes_sent_per_peer(),
        peak_bytes_per_sync=run.peak_bytes_per_sync(),
        rounds=run.rounds(),
        wall_s=round(time.perf_counter() - started, 2),
        eval_curve=curve,
    )


class _DataParallelRun:
    """The baseline: M peers' gradients averaged every step (one model stands for all M)."""

    def __init__(
        self,
        cfg: SimulationConfig,
        model: CausalLM,
        samplers: list[BatchSampler],
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.samplers = samplers
        self.trainer = InnerTrainer(copy.deepcopy(model), cfg.inner, device=device)
        self.parameters = count_parameters(self.trainer.model)
        self.num_fragments = 1
        self.outer_cfg = cfg.outer
        self.bytes_per_step = 0.0
        self._steps = 0
        bytes_per_value = 2 if cfg.outer.wire.codec == "bf16" else 4
        share = 2 * (cfg.peers - 1) / cfg.peers
        self.bytes_per_step = share * bytes_per_value * self.parameters

    def step(self, step: int) -> float:
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        summed = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        losses = []
        for sampler in self.samplers:
            losses.append(self.trainer.backward(*sampler.next()))
            for total, p in zip(summed, params, strict=True):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if self.cfg.outer.wire.codec == "bf16":
                    grad = grad.to(torch.bfloat16)
                total.add_(grad.to(torch.float32))
                p.grad = None
        for total, p in zip(summed, params, strict=True):
            p.grad = (total / len(self.samplers)).to(p.dtype)
        self.trainer.optimizer_step()
        self._steps += 1
        return sum(losses) / len(losses)

    def finish(self, step: int) -> None:
        return None

    def eval_model(self) -> torch.nn.Module:
        return self.trainer.model

    def replica_losses(
        self, eval_set: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[float | None, float | None]:
        return None, None

    def bytes_sent_per_peer(self) -> float:
        return self.bytes_per_step * self._steps

    def peak_bytes_per_sync(self) -> float:
        return self.bytes_per_step if self._steps else 0.0

    def rounds(self) -> int:
        return self._steps


class _OuterRun:
    """M replicas, each with its own Streaming DiLoCo outer loop, on an in-memory hub."""

    def __init__(
        self,
        cfg: SimulationConfig,
        model: CausalLM,
        samplers: list[BatchSampler],
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.samplers = samplers
        self.outer_cfg = _resolve_outer(cfg, model)
        self.hub = InMemoryHub(
            cfg.peers, self.outer_cfg.wire, seed=cfg.seed, clip_factor=self.outer_cfg.clip_factor
        )
        self.trainers: list[InnerTrainer] = []
        self.workers: list[StreamingDiLoCo] = []
        for peer in range(cfg.peers):
            trainer = InnerTrainer(copy.deepcopy(model), cfg.inner, device=device)
            fragments = derive_fragments(
                trainer.model, self.outer_cfg.fragments, self.outer_cfg.layout
            )
            self.trainers.append(trainer)
            self.workers.append(StreamingDiLoCo(fragments, self.outer_cfg, self.hub.averager(peer)))
        self.parameters = count_parameters(self.trainers[0].model)
        self.num_fragments = self.outer_cfg.fragments
        self._eval_model = copy.deepcopy(self.trainers[0].model)
        self._eval_fragments = derive_fragments(
            self._eval_model, self.num_fragments, self.outer_cfg.layout
        )

    def step(self, step: int) -> float:
        losses = []
        for trainer, worker, sampler in zip(
            self.trainers, self.workers, self.samplers, strict=True
        ):
            losses.append(trainer.train_step(*sampler.next()))
            worker.add_tokens(self.cfg.inner.tokens_per_step)
        # Lock step: all peers send before any receives, as if the network were instant.
        for worker in self.workers:
            worker.prepare(step)
        for worker in self.workers:
            worker.perform(step)
        return sum(losses) / len(losses)

    def finish(self, step: int) -> None:
        for worker in self.workers:
            worker.drain(step)
        if self.cfg.final_sync:
            # The flush is not a scheduled sync: keep it out of the peak-bandwidth figure.
            before = dict(self.hub.bytes_at_step)
            for worker in self.workers:
                worker.flush(step)
            for worker in self.workers:
                worker.perform(step)
            self.hub.bytes_at_step = defaultdict(float, before)

    def eval_model(self) -> torch.nn.Module:
        """A model holding θ_g, the outer parameters (identical on every peer)."""
        for fragment, global_params in zip(
            self._eval_fragments, self.workers[0].global_params, strict=True
        ):
            assign_flat(fragment.params, global_params)
        return self._eval_model

    def replica_losses(
        self, eval_set: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[float | None, float | None]:
        """Mean loss of the replicas' own θ, and loss of their average (paper Table 3)."""
        device = self.trainers[0].device
        losses = [evaluate(t.model, eval_set, device) for t in self.trainers]
        average = copy.deepcopy(self.trainers[0].model)
        stacked = [flatten(list(t.model.parameters())) for t in self.trainers]
        assign_flat(list(average.parameters()), torch.stack(stacked).mean(dim=0))
        return round(sum(losses) / len(losses), 4), round(evaluate(average, eval_set, device), 4)

    def bytes_sent_per_peer(self) -> float:
        return self.hub.bytes_sent[0]

    def peak_bytes_per_sync(self) -> float:
        return max(self.hub.bytes_at_step.values(), default=0.0)

    def rounds(self) -> int:
        return self.hub.rounds
