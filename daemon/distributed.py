"""A site of many ranks: torch.distributed inside a site, Streaming DiLoCo between sites.

Under ``torchrun``, every rank of a site trains one replica of the model on its own slice
of the site's data: DDP by default (every rank holds the whole model; gradients are
averaged every step), or FSDP2 (``fully_shard``: each rank holds a shard of every
parameter and of the optimizer state). The whole site is **one peer** of the run: rank 0
is its only voice on the network (one identity, one DHT record, one status service), and
its token weight is the sum of its ranks'.

The outer state (θ_g and momentum, fp32 on the CPU) lives on rank 0 only. Each inner step
the ranks run the same short protocol, so that they always enter the same collectives in
the same order:

1. ``sum_tokens``: all-reduce of the tokens trained this step (the site's weight).
2. ``plan`` (broadcast from rank 0): the step counter, and the fragments rank 0 may touch
   this step (those due to send, and those whose result is due to land).
3. ``gather``: with FSDP2 the ranks all-gather those fragments' shards and rank 0 copies
   the full tensors into its *shadow* (full-shape CPU tensors its outer state works on);
   with DDP rank 0 already holds them and nothing moves.
4. Rank 0 sends and applies (``prepare``/``perform``: the outer step and merge).
5. ``outcome`` (broadcast from rank 0): which fragments changed, whether θ was reset from
   a downloaded state (a join, a far-behind catch-up), whether to checkpoint, whether to
   stop after this step.
6. ``distribute``: the new θ of the changed fragments goes from rank 0 to every rank —
   a broadcast per parameter (DDP) or a scatter of shards (FSDP2, ``distribute_tensor``).

Gather/broadcast through rank 0 was chosen over a sharded outer state (each rank the outer
step of its shard) because only rank 0 talks to the other sites anyway: its inter-site
exchange of a fragment dwarfs the intra-site collectives (``benchmarks/site_scaling.py``
measures the share), and one outer state keeps checkpoints and resumes independent of the
number of ranks.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from locod.daemon.config import SiteConfig
from locod.daemon.faults import FaultPlan
from locod.daemon.status import StatusBoard
from locod.peer.fragments import Fragment

if TYPE_CHECKING:
    from locod.daemon.outer_loop import OuterLoop

CONTROL_FIELDS = 4
"""step, reset, checkpoint, stop: the fixed head of an outcome message."""


@dataclass(frozen=True, slots=True)
class RankGroup:
    """This process's place in its site: rank, number of ranks, rank on this node."""

    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        """Rank 0 speaks for the site: network, outer state, checkpoints, status."""
        return self.rank == 0


def launched_ranks() -> RankGroup | None:
    """The rank group torchrun describes in the environment, or None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return RankGroup(
        rank=int(os.environ.get("RANK", "0")),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_ranks(device: torch.device, timeout_s: float) -> RankGroup | None:
    """Join torch.distributed under torchrun (NCCL on CUDA, gloo on CPU); None alone.

    ``timeout_s`` bounds every collective: a rank whose peer rank died fails instead of
    hanging, and torchrun restarts the site.
    """
    ranks = launched_ranks()
    if ranks is None:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # The ranks of a restarted site meet in a namespace of their own attempt: keys
            # the previous attempt left in the agent's store (a dead rank's address) must
            # not be read as this attempt's.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            agent_store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                ranks.world,
                is_master=False,
                timeout=timeout,
            )
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(f"locod/attempt-{attempt}", agent_store),
                rank=ranks.rank,
                world_size=ranks.world,
                timeout=timeout,
            )
        else:
            dist.init_process_group(backend, timeout=timeout)
    return RankGroup(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=ranks.local_rank)


def group_of_initialized() -> RankGroup | None:
    """The rank group of a user's own torch.distributed setup (library API), if any."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return RankGroup(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def broadcast_object(value: Any, ranks: RankGroup) -> Any:
    """``value`` from rank 0 on every rank (small, trusted objects of one site only)."""
    holder = [value if ranks.leader else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def is_sharded(param: torch.Tensor) -> bool:
    """True for an FSDP2 (DTensor) parameter."""
    return hasattr(param, "full_tensor") and hasattr(param, "device_mesh")


def shadow_fragments(fragments: Sequence[Fragment]) -> list[Fragment]:
    """Full-shape fp32 CPU stand-ins for sharded fragments: what rank 0's outer state
    reads θ from and merges into, between a gather and a distribute."""
    return [
        Fragment(
            f.index,
            f.names,
            tuple(
                nn.Parameter(torch.zeros(tuple(p.shape), dtype=torch.float32), requires_grad=False)
                for p in f.params
            ),
        )
        for f in fragments
    ]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What rank 0 did in one step, as every rank learns it."""

    step: int
    changed: tuple[int, ...]
    reset: bool
    checkpoint: bool
    stop: bool


class RankSync:
    """The per-step collectives of one site's ranks (see the module docstring)."""

    def __init__(
        self,
        ranks: RankGroup,
        fragments: Sequence[Fragment],
        *,
        device: torch.device,
        shadow: Sequence[Fragment] | None = None,
    ) -> None:
        self.ranks = ranks
        self.fragments = list(fragments)
        """The model's own fragments on this rank (DTensors under FSDP2)."""
        self.shadow = list(shadow) if shadow is not None else None
        """Rank 0's full-shape copies under FSDP2; None with DDP (the model is whole)."""
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self.sharded = any(is_sharded(p) for f in self.fragments for p in f.params)
        self.collective_s = 0.0
        """Wall time spent in gather and distribute (for the site-scaling figure)."""

    def _control(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return [int(v) for v in tensor.tolist()]

    def sum_tokens(self, tokens: float) -> float:
        tensor = torch.tensor([float(tokens)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def plan(self, step: int, touch: Sequence[int]) -> tuple[int, list[int]]:
        """Rank 0's step counter and the fragments it may touch this step."""
        mask = [1 if p in set(touch) else 0 for p in range(len(self.fragments))]
        values = self._control([step, *mask])
        return values[0], [p for p, bit in enumerate(values[1:]) if bit]

    def outcome(self, outcome: Outcome) -> Outcome:
        """Rank 0's outcome of the step, on every rank."""
        mask = [1 if p in set(outcome.changed) else 0 for p in range(len(self.fragments))]
        values = self._control(
            [outcome.step, int(outcome.reset), int(outcome.checkpoint), int(outcome.stop), *mask]
        )
        head, bits = values[:CONTROL_FIELDS], values[CONTROL_FIELDS:]
        return Outcome(
            step=head[0],
            changed=tuple(p for p, bit in enumerate(bits) if bit),
            reset=bool(head[1]),
            checkpoint=bool(head[2]),
            stop=bool(head[3]),
        )

    @torch.no_grad()
    def gather(self, fragments: Sequence[int]) -> None:
        """FSDP2: every rank all-gathers these fragments; rank 0 keeps them in its shadow."""
        if not self.sharded or not fragments:
            return
        began = time.perf_counter()
        for p in sorted(fragments):
            for i, param in enumerate(self.fragments[p].params):
                full = cast(Any, param).full_tensor() if is_sharded(param) else param.detach()
                if self.shadow is not None:
                    self.shadow[p].params[i].copy_(full.to("cpu", torch.float32))
        self.collective_s += time.perf_counter() - began

    @torch.no_grad()
    def distribute(self, fragments: Sequence[int]) -> None:
        """Rank 0's θ of these fragments onto every rank."""
        if not fragments:
            return
        from torch.distributed.tensor import distribute_tensor

        began = time.perf_counter()
        for p in sorted(fragments):
            for i, param in enumerate(self.fragments[p].params):
                if is_sharded(param):
                    dtensor = cast(Any, param)
                    source = (
                        self.shadow[p].params[i].detach()
                        if self.shadow is not None
                        else torch.empty(tuple(param.shape), dtype=torch.float32)
                    )
                    source = source.to(self.device, param.dtype)
                    param.copy_(
                        distribute_tensor(
                            source, dtensor.device_mesh, dtensor.placements, src_data_rank=0
                        )
                    )
                else:
                    dist.broadcast(param.data, src=0)
        self.collective_s += time.perf_counter() - began


def state_dict_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full model and optimizer state on rank 0 (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return {"model": model_state, "optimizer": optimizer_state}


def load_state_dict_into(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None
) -> None:
    """Full state into every rank's model and optimizer, whatever the number of ranks that
    saved it. Under torch.distributed it is a collective: rank 0 passes the state, the
    others None, and rank 0's is broadcast."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    distributed = dist.is_initialized()
    # An optimizer without state (plain SGD) has nothing to restore, and
    # torch.distributed.checkpoint refuses an empty one.
    has_optimizer_state = bool(state is not None and state["optimizer"].get("state"))
    if distributed:
        holder = [has_optimizer_state]
        dist.broadcast_object_list(holder, src=0)
        has_optimizer_state = bool(holder[0])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    empty: dict[str, Any] = {}
    set_model_state_dict(model, state["model"] if state is not None else empty, options=options)
    if has_optimizer_state:
        set_optimizer_state_dict(
            model,
            optimizer,
            state["optimizer"] if state is not None else empty,
            options=options,
        )


class FollowerSite:
    """The site as a rank other than 0 sees it: no network, no status service.

    Rank 0 speaks for the site; the other ranks only take part in its collectives, so
    this object offers what their training loop uses: the config, the faults, and
    ``streaming_diloco``, which mirrors rank 0's.
    """

    def __init__(
        self, cfg: SiteConfig, ranks: RankGroup, *, log: logging.Logger | None = None
    ) -> None:
        self.cfg = cfg
        self.ranks = ranks
        self.log = log or logging.getLogger("locod")
        self.board = StatusBoard()
        self.faults = FaultPlan.parse(cfg.faults)
        self.joining = False
        self.ctx = None
        self.averager = None
        self.redraw: Callable[[], None] = lambda: None
        self.listen_address = ""
        """Rank 0 serves the site's gRPC; this rank serves nothing."""

    def __enter__(self) -> FollowerSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Nothing to start: rank 0 runs the site."""

    def stop(self) -> None:
        """Nothing to stop: rank 0 runs the site."""

    def streaming_diloco(self, model: nn.Module, **options: Any) -> OuterLoop:
        from locod.daemon.outer_loop import attach

        options.setdefault("ranks", self.ranks)
        return attach(self, model, **options)
