"""The built-in training loop of ``locod start``: one model on one corpus, on a site.

It is a client of the library API like any user's loop: it builds the model the run
config names, puts it under Streaming DiLoCo with ``site.streaming_diloco(...)`` and calls
``outer.step(tokens)`` after every inner step. What it adds is its own: the corpus and the
data stream, the inner optimizer (AdamW), evaluation of the outer parameters θ_g on
held-out batches, and its share of each checkpoint (local model, optimizer, data
position), so a restarted peer resumes where it stopped.

Under torchrun every rank runs this loop (:mod:`locod.daemon.distributed`): the model is
wrapped in DDP or sharded with FSDP2, each rank reads its rows of one site-wide batch
(``--batch-size`` sequences per rank), and rank 0 alone evaluates and reports.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from typing import Any

import click
import torch
from torch import nn

from locod.daemon.config import DaemonConfig, adopt_run_config, build_daemon_config
from locod.daemon.distributed import (
    FollowerSite,
    RankGroup,
    broadcast_object,
    load_state_dict_into,
    state_dict_of,
)
from locod.daemon.live import LiveView
from locod.daemon.outer_loop import OuterLoop
from locod.daemon.settings import build_read_settings
from locod.daemon.site import Site, StartError
from locod.peer.data import BatchSampler, Corpus, CorpusError, heldout_batches, load_corpus
from locod.peer.fragments import derive_fragments, find_blocks
from locod.peer.inner import InnerTrainer, evaluate
from locod.peer.model import CausalLM, ModelError, build_model

PARALLEL_MODES = ("auto", "ddp", "fsdp")


class _Loss(nn.Module):
    """The model's loss as a module's forward, so DDP synchronizes its gradients."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(inputs, targets)


def choose_parallel(mode: str, model: nn.Module, device: torch.device) -> str:
    """``auto``: FSDP2 when the model with AdamW state would not fit on one device, else DDP."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "ddp"
    free, _ = torch.cuda.mem_get_info(device)
    # fp32 weights, gradients and two AdamW moments: 16 bytes per parameter, plus room
    # for activations.
    needed = 16 * sum(p.numel() for p in model.parameters())
    return "fsdp" if needed > 0.6 * free else "ddp"


class Trainer:
    """``locod start``'s loop: corpus, model, inner steps, evaluation, checkpoints."""

    def __init__(
        self,
        cfg: DaemonConfig,
        *,
        stop: threading.Event,
        view: LiveView,
        log: logging.Logger,
        ranks: RankGroup | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.view = view
        self.log = log
        self.ranks = ranks
        self.corpus: Corpus | None = None
        self.device = torch.device("cpu")
        self.trainer: InnerTrainer | None = None
        self.sampler: BatchSampler | None = None
        self.outer: OuterLoop | None = None
        self.why_stopped = ""

    @property
    def leader(self) -> bool:
        return self.ranks is None or self.ranks.leader

    def load_corpus(self) -> None:
        """Before the site starts, so that a bad --data or --device fails in seconds."""
        cfg = self.cfg
        try:
            read = build_read_settings(cfg.values)
            self.corpus = load_corpus(cfg.data or None, cache_dir=cfg.cache_dir, read=read)
        except CorpusError as error:
            raise StartError(str(error)) from error
        except click.UsageError as error:
            raise StartError(error.message) from error
        self.log.info("corpus: %s", self.corpus.description)
        device = torch.device(cfg.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise StartError(f"--device {cfg.device}: CUDA is not available on this machine")
            if self.ranks is not None and device.index is None:
                device = torch.device("cuda", self.ranks.local_rank)
            torch.cuda.set_device(device)
        self.device = device

    def settle_run_config(self, site: Site | FollowerSite) -> None:
        """A joiner adopts the run's config before building the model it names; the other
        ranks of a site take rank 0's."""
        if isinstance(site, Site) and site.joining:
            run = site.run_config_of_run()
            if run is None:
                raise StartError(
                    f"no run named {self.cfg.site.run_name!r} was found through "
                    f"{', '.join(self.cfg.site.join)}; check --run and --join"
                )
            try:
                self.cfg = adopt_run_config(self.cfg, run)
            except Exception as error:  # click.UsageError: the message is the point
                raise StartError(str(getattr(error, "message", error))) from error
        if self.ranks is not None:
            values = broadcast_object(self.cfg.values if self.leader else None, self.ranks)
            if not self.leader:
                self.cfg = build_daemon_config(values, self.cfg.explicit)

    def _data_seed(self, site: Site | FollowerSite) -> int:
        """Every site samples its own stream: the seed mixes in its identity (rank 0's)."""
        seed = self.cfg.data_seed
        if not seed and isinstance(site, Site):
            seed = int(site.peer_id[:8], 16)
        if self.ranks is not None:
            seed = int(broadcast_object(seed, self.ranks))
        return seed

    def run(self, site: Site | FollowerSite) -> None:
        """Train until --max-steps or a stop; checkpoint on the way out."""
        self.settle_run_config(site)
        cfg, corpus, ranks = self.cfg, self.corpus, self.ranks
        assert corpus is not None
        world, rank = (ranks.world, ranks.rank) if ranks is not None else (1, 0)
        try:
            model = build_model(cfg.run.model, seed=cfg.run.seed, vocab_size=corpus.vocab_size)
        except ModelError as error:
            raise StartError(str(error)) from error
        model = model.to(self.device)
        # Rank 0 evaluates θ_g on a whole copy (taken before any sharding).
        eval_model: CausalLM = copy.deepcopy(model) if self.leader else model
        mode = choose_parallel(cfg.parallel, model, self.device)
        if ranks is not None and mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in find_blocks(model) or []:
                fully_shard(block)
            fully_shard(model)
        self.trainer = trainer = InnerTrainer(model, cfg.inner, device=self.device)
        if ranks is not None and mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            trainer.loss_fn = DistributedDataParallel(
                _Loss(model),
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        if ranks is not None:
            self.log.info("rank %d of %d, %s, on %s", rank, world, mode.upper(), self.device)
        self.sampler = sampler = BatchSampler(
            corpus.train,
            batch_size=cfg.inner.batch_size * world,
            seq_len=cfg.inner.seq_len,
            seed=self._data_seed(site),
        )
        rows = slice(rank * cfg.inner.batch_size, (rank + 1) * cfg.inner.batch_size)
        eval_set = heldout_batches(
            corpus.heldout,
            batch_size=cfg.inner.batch_size,
            seq_len=cfg.inner.seq_len,
            num_batches=cfg.eval_batches,
        )
        eval_fragments = (
            derive_fragments(eval_model, cfg.run.fragments, cfg.run.layout) if self.leader else []
        )
        max_steps = cfg.max_steps
        tokenizer = cfg.values.get("tokenizer") or None
        self.outer = outer = site.streaming_diloco(
            model,
            outer=cfg.outer,
            values=cfg.values,
            explicit=cfg.explicit,
            checkpoint_extra=self._checkpoint_extra,
            restore_extra=self._restore_extra,
            stop_when=lambda step: self.stop.is_set() or bool(max_steps and step >= max_steps),
            stop=self.stop,
            ranks=ranks,
            device=self.device,
            tokenizer=str(tokenizer) if tokenizer else None,
        )

        def evaluate_outer() -> None:
            outer.load_global_into(eval_fragments)
            loss = evaluate(eval_model, eval_set, self.device)
            with site.board.lock:
                site.board.eval_loss = loss
                site.board.evals.append((outer.inner_step, round(loss, 4)))
            self.log.info("step %d: eval loss of the outer parameters %.4f", outer.inner_step, loss)

        tokens_per_step = cfg.inner.tokens_per_step
        step_delay_s = site.faults.step_delay_s()
        while not outer.should_stop:
            if step_delay_s:
                time.sleep(step_delay_s)  # fault injection: a slower machine
            loss = trainer.train_step(*sampler.next(rows))
            if not math.isfinite(loss):
                self.log.error(
                    "training loss is %s at step %d; this step's update may be damaged",
                    loss,
                    outer.inner_step + 1,
                )
            outer.step(tokens_per_step, loss=loss)
            self._maybe_exit(site, rank, outer.inner_step)
            if self.leader and cfg.eval_every and outer.inner_step % cfg.eval_every == 0:
                evaluate_outer()
            if isinstance(site, Site) and site.ctx is not None:
                self.view.update(site.board, site.ctx)
        by_signal = self.stop.is_set()
        outer.finish(drain=not by_signal)
        if not self.leader:
            return
        if by_signal:
            self.why_stopped = "stopped by a signal"
            return
        if cfg.eval_every:
            evaluate_outer()
        self.why_stopped = f"reached --max-steps {cfg.max_steps}"
        self.log.info("reached --max-steps %d", cfg.max_steps)
        if cfg.linger and isinstance(site, Site) and site.ctx is not None:
            site.board.update(state="finished", note="serving until stopped")
            self.view.update(site.board, site.ctx, force=True)
            while not self.stop.wait(1.0):
                self.view.update(site.board, site.ctx)

    def _maybe_exit(self, site: Site | FollowerSite, rank: int, step: int) -> None:
        """Fault injection: this rank dies like SIGKILL after ``step``, once per state dir."""
        if not site.faults.exits_at(rank, step):
            return
        marker = self.cfg.site.state_dir / f"fault-exit-at-step-{step}-rank-{rank}"
        if marker.exists():
            return
        marker.touch()
        self.log.error("fault injected: rank %d exits after step %d", rank, step)
        for handler in self.log.handlers:
            handler.flush()
        os._exit(137)

    def _checkpoint_extra(self) -> dict[str, Any]:
        """This trainer's share of a checkpoint (a collective under FSDP2: every rank)."""
        trainer, sampler = self.trainer, self.sampler
        assert trainer is not None and sampler is not None
        tokenizer = self.cfg.values.get("tokenizer")
        return {
            "inner_step": trainer.step,
            "sampler": sampler.state_dict(),
            # Where this peer's tokenizer is, for `locod export` / `sample` (a local path).
            "tokenizer": str(tokenizer) if tokenizer else None,
            **state_dict_of(trainer.model, trainer.optimizer),
        }

    def _restore_extra(self, extra: dict[str, Any] | None) -> None:
        """Back from a checkpoint (rank 0 passes it; the other ranks None and get rank 0's)."""
        trainer, sampler = self.trainer, self.sampler
        assert trainer is not None and sampler is not None
        load_state_dict_into(trainer.model, trainer.optimizer, extra)
        position = (extra["inner_step"], extra["sampler"]) if extra is not None else None
        if self.ranks is not None:
            position = broadcast_object(position, self.ranks)
        assert position is not None
        trainer.step = int(position[0])
        sampler.load_state_dict(position[1])
