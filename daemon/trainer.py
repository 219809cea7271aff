"""The built-in training loop of ``locod start``: one model on one corpus, on a site.

It is a client of the library API like any user's loop: it builds the model the run
config names, puts it under Streaming DiLoCo with ``site.streaming_diloco(...)`` and calls
``outer.step(tokens)`` after every inner step. What it adds is its own: the corpus and the
data stream, the inner optimizer (AdamW), evaluation of the outer parameters θ_g on
held-out batches, and its share of each checkpoint (local model, optimizer, data
position), so a restarted peer resumes where it stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from typing import Any

import torch

from locod.daemon.config import DaemonConfig, adopt_run_config
from locod.daemon.live import LiveView
from locod.daemon.outer_loop import OuterLoop
from locod.daemon.site import Site, StartError
from locod.peer.data import BatchSampler, Corpus, CorpusError, heldout_batches, load_corpus
from locod.peer.fragments import partition
from locod.peer.inner import InnerTrainer, evaluate
from locod.peer.model import ByteTransformer, build_model, model_config


class Trainer:
    """``locod start``'s loop: corpus, model, inner steps, evaluation, checkpoints."""

    def __init__(
        self,
        cfg: DaemonConfig,
        *,
        stop: threading.Event,
        view: LiveView,
        log: logging.Logger,
    ) -> None:
        self.cfg = cfg
        self.stop = stop
        self.view = view
        self.log = log
        self.corpus: Corpus | None = None
        self.device = torch.device("cpu")
        self.trainer: InnerTrainer | None = None
        self.sampler: BatchSampler | None = None
        self.outer: OuterLoop | None = None
        self.why_stopped = ""

    def load_corpus(self) -> None:
        """Before the site starts, so that a bad --data or --device fails in seconds."""
        cfg = self.cfg
        try:
            self.corpus = load_corpus(cfg.data or None, cache_dir=cfg.cache_dir)
        except CorpusError as error:
            raise StartError(str(error)) from error
        self.log.info("corpus: %s", self.corpus.description)
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise StartError(f"--device {cfg.device}: CUDA is not available on this machine")
        self.device = device

    def settle_run_config(self, site: Site) -> None:
        """A joiner adopts the run's config before building the model it names."""
        if not site.joining:
            return
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

    def run(self, site: Site) -> None:
        """Train until --max-steps or a stop; checkpoint on the way out."""
        self.settle_run_config(site)
        cfg, corpus = self.cfg, self.corpus
        assert corpus is not None
        model = build_model(model_config(cfg.run.model), seed=cfg.run.seed)
        self.trainer = trainer = InnerTrainer(model, cfg.inner, device=self.device)
        # Every peer samples its own stream: the seed mixes in its identity.
        self.sampler = sampler = BatchSampler(
            corpus.train,
            batch_size=cfg.inner.batch_size,
            seq_len=cfg.inner.seq_len,
            seed=int(site.peer_id[:8], 16),
        )
        eval_set = heldout_batches(
            corpus.heldout,
            batch_size=cfg.inner.batch_size,
            seq_len=cfg.inner.seq_len,
            num_batches=cfg.eval_batches,
        )
        eval_model: ByteTransformer = copy.deepcopy(model)
        eval_fragments = partition(
            eval_model, list(eval_model.blocks), cfg.run.fragments, cfg.run.layout
        )
        self.outer = outer = site.streaming_diloco(
            model,
            blocks=list(model.blocks),
            outer=cfg.outer,
            values=cfg.values,
            explicit=cfg.explicit,
            checkpoint_extra=self._checkpoint_extra,
            restore_extra=self._restore_extra,
            stop=self.stop,
        )

        def evaluate_outer() -> None:
            outer.load_global_into(eval_fragments)
            loss = evaluate(eval_model, eval_set, self.device)
            with site.board.lock:
                site.board.eval_loss = loss
                site.board.evals.append((outer.inner_step, round(loss, 4)))
            self.log.info("step %d: eval loss of the outer parameters %.4f", outer.inner_step, loss)

        ctx = site.ctx
        assert ctx is not None
        tokens_per_step = cfg.inner.tokens_per_step
        step_delay_s = ctx.faults.step_delay_s()
        while not self.stop.is_set() and not (cfg.max_steps and outer.inner_step >= cfg.max_steps):
            if step_delay_s:
                time.sleep(step_delay_s)  # fault injection: a slower machine
            loss = trainer.train_step(*sampler.next())
            if not math.isfinite(loss):
                self.log.error(
                    "training loss is %s at step %d; this step's update may be damaged",
                    loss,
                    outer.inner_step + 1,
                )
            outer.step(tokens_per_step, loss=loss)
            if cfg.eval_every and outer.inner_step % cfg.eval_every == 0:
                evaluate_outer()
            self.view.update(site.board, ctx)
        if self.stop.is_set():
            self.why_stopped = "stopped by a signal"
            outer.checkpoint()
            return
        outer.finish()
        if cfg.eval_every:
            evaluate_outer()
        self.why_stopped = f"reached --max-steps {cfg.max_steps}"
        self.log.info("reached --max-steps %d", cfg.max_steps)
        if cfg.linger:
            site.board.update(state="finished", note="serving until stopped")
            self.view.update(site.board, ctx, force=True)
            while not self.stop.wait(1.0):
                self.view.update(site.board, ctx)

    def _checkpoint_extra(self) -> dict[str, Any]:
        trainer, sampler = self.trainer, self.sampler
        assert trainer is not None and sampler is not None
        return {
            "inner_step": trainer.step,
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "sampler": sampler.state_dict(),
        }

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        trainer, sampler = self.trainer, self.sampler
        assert trainer is not None and sampler is not None
        trainer.model.load_state_dict(extra["model"])
        trainer.optimizer.load_state_dict(extra["optimizer"])
        trainer.step = int(extra["inner_step"])
        sampler.load_state_dict(extra["sampler"])
