"""Streaming DiLoCo around any model on a live site: the loop that the library API and
``locod start`` both drive.

::

    with locod.found(run="my-run") as site:
        outer = site.streaming_diloco(model, inner_steps=100)
        for batch in loader:
            loss = model(...); loss.backward(); opt.step(); opt.zero_grad()
            outer.step(tokens=batch_tokens)

:func:`attach` derives the model's fragments (its repeated blocks), settles the run
config (a joiner adopts the run's; a setting given on purpose that contradicts it, or a
model of another structure, is refused naming every difference), restores the outer state
from the site's checkpoint, takes the run's current state when joining, and marks the
site ready. :meth:`OuterLoop.step` then runs after every inner step: count tokens, send
the fragments due (``prepare``), apply the results due τ steps after their send
(``perform``), catch up when this peer came late to its groups, publish figures, and
checkpoint the outer state every ``checkpoint_every_s``. The user's inner optimizer and
its state stay theirs; what else goes in the checkpoint is up to ``checkpoint_extra``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from locod.daemon.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from locod.daemon.config import RUN_KEYS, RunConfig, differing_settings, run_config_from
from locod.daemon.distributed import (
    FollowerSite,
    Outcome,
    RankGroup,
    RankSync,
    broadcast_object,
    group_of_initialized,
    is_sharded,
    shadow_fragments,
)
from locod.daemon.settings import ALGORITHM, build_algorithm
from locod.daemon.site import Site
from locod.daemon.state_transfer import DownloadError
from locod.daemon.status import FragmentFigures
from locod.peer.averaging import SyncOutcome, SyncRequest
from locod.peer.config import OuterConfig
from locod.peer.fingerprint import fingerprint, model_description
from locod.peer.fragments import (
    Fragment,
    assign_flat,
    derive_fragments,
    find_blocks,
    fragments_due,
    next_sync_step,
    partition,
    partition_by_order,
)
from locod.peer.streaming import StreamingDiLoCo
from locod.peer.tokenizer import tokenizer_fingerprint

RESERVED_CHECKPOINT_KEYS = frozenset({"format", "run_config", "step", "tokens", "outer"})
"""Keys of a checkpoint that belong to the outer loop; ``checkpoint_extra`` adds others."""

CUSTOM_MODEL = "custom"
"""The ``model`` run setting of a model the user built (its structure hash tells it apart)."""


def algorithm_values(options: dict[str, Any]) -> dict[str, Any]:
    """Algorithm settings as named in :data:`daemon.settings.ALGORITHM`, defaults filled in;
    TypeError for a name that is not one."""
    by_name = {s.name: s for s in ALGORITHM}
    unknown = sorted(set(options) - set(by_name))
    if unknown:
        raise TypeError(
            f"unknown Streaming DiLoCo option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(by_name))}"
        )
    return {name: s.default for name, s in by_name.items()} | options


class _NoAverager:
    """Placeholder until the site serves rounds; no round can start before it."""

    def start(self, request: SyncRequest) -> None:
        raise RuntimeError("the site is not serving rounds yet")

    def result(self, fragment: int, round_index: int, timeout_s: float) -> SyncOutcome | None:
        return None

    def abandon(self, fragment: int, round_index: int) -> None:
        return None


def attach(
    site: Site | FollowerSite,
    model: nn.Module,
    *,
    blocks: Sequence[nn.Module] | None = None,
    outer: OuterConfig | None = None,
    values: dict[str, Any] | None = None,
    explicit: frozenset[str] | None = None,
    checkpoint_extra: Callable[[], dict[str, Any]] | None = None,
    restore_extra: Callable[[dict[str, Any] | None], None] | None = None,
    stop_when: Callable[[int], bool] | None = None,
    stop: threading.Event | None = None,
    ranks: RankGroup | None = None,
    device: torch.device | None = None,
    fragment_names: Sequence[Sequence[str]] | None = None,
    tokenizer: str | None = None,
    **options: Any,
) -> OuterLoop:
    """Put ``model`` under Streaming DiLoCo on ``site`` and return the loop to step.

    Options are the algorithm settings of ``locod start`` by name (``inner_steps``,
    ``fragments``, ``overlap``, ``alpha``, ``outer_lr``, ``wire``, ...); those given are
    *explicit*: a joiner whose explicit option contradicts the run's config is refused.
    ``blocks`` are the model's repeated transformer blocks (found by default:
    ``model.model.layers``, ``transformer.h``, ``blocks``, ...; a model without any is
    fragmented by parameter order); ``fragment_names`` gives the fragments explicitly
    (lists of parameter names). ``tokenizer``: the path of the tokenizer.json the data
    was read through (peers must agree on it; None: bytes or the user's own).
    ``locod start`` passes its resolved ``values``/``explicit`` and ``outer`` instead.
    ``checkpoint_extra`` returns more state to keep in each checkpoint (the built-in
    trainer's model, optimizer and data position); ``restore_extra`` gets it back (on
    the other ranks of a multi-rank site, with None: they take rank 0's state).
    ``stop_when(step)`` says whether to stop after that step (``loop.should_stop``);
    setting ``stop`` (an event) stops waits for peers and late results, and the loop.
    ``ranks``: this process's place in a multi-rank site (default: the torch.distributed
    group the caller initialized, if any); every rank calls ``attach`` and ``step``.
    """
    if values is None:
        values = algorithm_values(options)
        explicit = frozenset(options)
        if "model" not in options:
            values["model"] = CUSTOM_MODEL
    elif options:
        raise TypeError("pass either values= or algorithm options, not both")
    explicit = explicit or frozenset()
    blocks = list(blocks) if blocks is not None else find_blocks(model)
    split = _splitter(model, blocks, fragment_names)
    ranks = ranks if ranks is not None else group_of_initialized()
    device = device or next(model.parameters()).device
    if ranks is not None and not ranks.leader:
        return _attach_follower(site, model, split, ranks, device, checkpoint_extra, restore_extra)
    if not isinstance(site, Site):
        raise TypeError("rank 0 of a site (or a one-process site) needs a Site")
    if fragment_names is not None:
        values = {**values, "fragments": len(fragment_names)}
    description = model_description(model)
    ours = run_config_from(values, num_blocks=len(blocks) if blocks else 0).with_identity(
        model_fingerprint=fingerprint(description),
        model_architecture=description["architecture"],
        tokenizer=tokenizer_fingerprint(tokenizer) if tokenizer else "",
    )
    run = _settle_run_config(site, ours, values, explicit)
    if outer is None or run.values != ours.values:
        _, outer = build_algorithm({**values, **run.values})
    outer.fragments = run.fragments
    checkpoint = _read_checkpoint(site)
    if checkpoint is not None and checkpoint.get("run_config") != run.as_dict():
        raise _start_error(
            f"the checkpoint in {site.cfg.state_dir} belongs to a run with config "
            f"{checkpoint.get('run_config')}, not {run.as_dict()}; use another "
            "state dir or the run's settings"
        )
    fragments = split(run)
    sync: RankSync | None = None
    if ranks is not None:
        broadcast_object(run.as_dict(), ranks)
        sharded = any(is_sharded(p) for f in fragments for p in f.params)
        shadow = shadow_fragments(fragments) if sharded else None
        sync = RankSync(ranks, fragments, device=device, shadow=shadow)
        sync.gather(range(len(fragments)))
        fragments = shadow or fragments
    worker = StreamingDiLoCo(fragments, outer, _NoAverager(), log=site.log.info)
    loop = OuterLoop(
        site,
        worker,
        run,
        checkpoint_extra=checkpoint_extra,
        stop_when=stop_when,
        stop=stop,
        sync=sync,
    )
    site.attach(worker, run, lambda: loop.inner_step)
    if site.joining and not site.cfg.client_only:
        _, membership = site.require()
        membership.check_reachable()
    extra = None
    if checkpoint is not None:
        loop.restore(checkpoint)
        extra = {k: v for k, v in checkpoint.items() if k not in RESERVED_CHECKPOINT_KEYS}
        if site.joining:
            # Back after a restart: the run moved on. Take its current outer state (the
            # inner optimizer and the data position are kept) before contributing (I5).
            loop.take_run_state(required=False)
    elif site.joining:
        loop.take_run_state(required=True)
    if sync is not None and ranks is not None:
        broadcast_object(extra is not None and restore_extra is not None, ranks)
    if extra is not None and restore_extra is not None:
        restore_extra(extra)
    if sync is not None and ranks is not None:
        broadcast_object((loop.inner_step, loop.tokens), ranks)
        sync.distribute(range(len(fragments)))
    _, membership = site.require()
    membership.wait_for_peers(site.cfg.min_peers, loop.stop_event, site.redraw)
    loop.should_stop = loop.stop_event.is_set() or (
        stop_when is not None and stop_when(loop.inner_step)
    )
    if ranks is not None:
        broadcast_object(loop.should_stop, ranks)
    site.board.update(state="training", note="")
    return loop


def _splitter(
    model: nn.Module,
    blocks: list[nn.Module] | None,
    names: Sequence[Sequence[str]] | None,
) -> Callable[[RunConfig], list[Fragment]]:
    """How this model is cut into the run's fragments: explicit names, else its blocks,
    else parameter order (the same rule on every peer and rank)."""

    def split(run: RunConfig) -> list[Fragment]:
        if names is not None:
            return derive_fragments(model, run.fragments, run.layout, names=names)
        if blocks:
            return partition(model, blocks, run.fragments, run.layout)
        return partition_by_order(model, run.fragments)

    return split


def _attach_follower(
    site: Site | FollowerSite,
    model: nn.Module,
    split: Callable[[RunConfig], list[Fragment]],
    ranks: RankGroup,
    device: torch.device,
    checkpoint_extra: Callable[[], dict[str, Any]] | None,
    restore_extra: Callable[[dict[str, Any] | None], None] | None,
) -> OuterLoop:
    """A rank other than 0: mirror rank 0's collectives of :func:`attach`."""
    run = RunConfig.from_dict(broadcast_object(None, ranks))
    fragments = split(run)
    sync = RankSync(ranks, fragments, device=device)
    sync.gather(range(len(fragments)))
    loop = OuterLoop(site, None, run, checkpoint_extra=checkpoint_extra, sync=sync)
    if broadcast_object(None, ranks) and restore_extra is not None:
        restore_extra(None)
    loop.inner_step, loop.tokens = broadcast_object(None, ranks)
    sync.distribute(range(len(fragments)))
    loop.should_stop = bool(broadcast_object(None, ranks))
    return loop


def _start_error(message: str) -> Exception:
    from locod.daemon.site import StartError

    return StartError(message)


def _settle_run_config(
    site: Site, ours: RunConfig, values: dict[str, Any], explicit: frozenset[str]
) -> RunConfig:
    """A founder's own config; a joiner's is the run's, unless it contradicts it."""
    if not site.joining:
        return ours
    published = site.run_config_of_run()
    if published is None:
        raise _start_error(
            f"no run named {site.cfg.run_name!r} was found through "
            f"{', '.join(site.cfg.join)}; check the run name and the join address"
        )
    mine = {**values, **ours.as_dict()}
    differing = differing_settings(published, mine, explicit)
    if differing:
        raise _start_error(
            "this peer's settings contradict the run's config:\n  "
            + "\n  ".join(differing)
            + "\ndrop these settings to adopt the run's values, or start a new run"
        )
    try:
        theirs = RunConfig.from_dict(published)
    except ValueError as error:
        raise _start_error(f"the run's published config is unusable: {error}") from error
    adopted = RunConfig(values={k: theirs.values[k] for k in RUN_KEYS})
    return adopted.with_identity(
        model_fingerprint=ours.model_fingerprint,
        model_architecture=ours.model_architecture,
        tokenizer=ours.tokenizer_fingerprint,
    )


def _read_checkpoint(site: Site) -> dict[str, Any] | None:
    """The site's last checkpoint; an unreadable one is moved aside and reported."""
    try:
        return load_checkpoint(site.cfg.state_dir)
    except CheckpointError as error:
        aside = site.cfg.state_dir / f"checkpoint.corrupt-{int(time.time())}.pt"
        (site.cfg.state_dir / "checkpoint.pt").rename(aside)
        site.log.error("%s; moved it to %s and starting without it", error, aside)
        return None


class OuterLoop:
    """One model's Streaming DiLoCo on a live site: call :meth:`step` after each inner step.

    On the ranks of a multi-rank site other than 0, ``worker`` is None: the loop only
    takes part in the site's collectives (:mod:`locod.daemon.distributed`).
    """

    def __init__(
        self,
        site: Site | FollowerSite,
        worker: StreamingDiLoCo | None,
        run: RunConfig,
        *,
        checkpoint_extra: Callable[[], dict[str, Any]] | None = None,
        stop_when: Callable[[int], bool] | None = None,
        stop: threading.Event | None = None,
        sync: RankSync | None = None,
    ) -> None:
        self.site = site
        self._worker = worker
        self.run = run
        self.checkpoint_extra = checkpoint_extra
        self.stop_when = stop_when
        self.sync = sync
        self.stop_event = stop or threading.Event()
        """Set to stop waiting (for peers) and stepping; a daemon's signal handler sets it."""
        self.should_stop = False
        """True once the loop's owner should stop stepping (on every rank alike)."""
        self.inner_step = 0
        """Inner steps taken (the schedule's clock; a joiner takes the run's)."""
        self.tokens = 0
        """Tokens the site trained on (the sum over its ranks)."""
        self._last_checkpoint = time.monotonic()
        self._began = time.monotonic()
        self._rate_window: list[tuple[float, int]] = []
        self.outer_s = 0.0
        """Wall time the training thread spent in the outer loop (send, apply, merge,
        intra-site collectives), not counting checkpoints."""
        self._first_step: tuple[float, int] | None = None

    @property
    def leader(self) -> bool:
        """This process holds the outer state (a one-process site, or rank 0)."""
        return self._worker is not None

    @property
    def worker(self) -> StreamingDiLoCo:
        if self._worker is None:
            raise RuntimeError("only rank 0 of a site holds the outer state")
        return self._worker

    @property
    def fragments(self) -> list[Fragment]:
        return self.worker.fragments

    # -- the step -------------------------------------------------------------------------

    def step(self, tokens: float, *, loss: float | None = None) -> list[int]:
        """After one inner step that trained on ``tokens`` tokens (this rank's): send what
        is due, apply what has arrived; returns the fragments whose θ changed."""
        if not tokens >= 0 or not math.isfinite(tokens):
            raise ValueError(f"tokens must be a finite count of 0 or more, got {tokens}")
        if self.sync is not None:
            tokens = self.sync.sum_tokens(tokens)
        if self._worker is None:
            return self._follow()
        worker, ctx = self.worker, self.site.ctx
        assert ctx is not None
        began = time.perf_counter()
        if self._first_step is None:
            self._first_step = (began, self.tokens)
        self.inner_step += 1
        self.tokens += int(tokens)
        ctx.step = self.inner_step
        if self.sync is not None:
            self.sync.plan(self.inner_step, self._may_touch(self.inner_step))
            self.sync.gather(self._may_touch(self.inner_step))
        worker.add_tokens(tokens)
        worker.prepare(self.inner_step)
        changed = worker.perform(self.inner_step)
        for p in changed:
            self._maybe_perturb(p)
        now = time.monotonic()
        self._rate_window = [(t, k) for t, k in self._rate_window if now - t < 30]
        self._rate_window.append((now, self.tokens))
        reset = False
        averager = self.site.averager
        if averager is not None and averager.behind_s > 0:
            behind, averager.behind_s = averager.behind_s, 0.0
            reset = self._catch_up(behind, tokens)
        if reset:
            changed = list(range(worker.num_fragments))
        every = self.site.cfg.checkpoint_every_s
        checkpoint = bool(every) and now - self._last_checkpoint > every
        self.should_stop = self.stop_event.is_set() or (
            self.stop_when is not None and self.stop_when(self.inner_step)
        )
        if self.sync is not None:
            self.sync.outcome(
                Outcome(self.inner_step, tuple(changed), reset, checkpoint, self.should_stop)
            )
            self.sync.distribute(changed)
        self.outer_s += time.perf_counter() - began
        self.publish_figures(loss)
        if checkpoint:
            self.checkpoint()
        return changed

    def _may_touch(self, step: int) -> list[int]:
        """Fragments whose θ rank 0 may read or write at ``step``: those due to send, and
        those in flight whose result is due to land."""
        worker = self.worker
        due = set(fragments_due(step, worker.num_fragments, self.run.inner_steps))
        landing = {p for p, flight in worker.in_flight.items() if flight.apply_at <= step}
        return sorted(due | landing)

    def _follow(self) -> list[int]:
        """A rank other than 0: take part in rank 0's step (see :meth:`step`)."""
        sync = self.sync
        assert sync is not None
        _, touch = sync.plan(0, [])
        sync.gather(touch)
        outcome = sync.outcome(Outcome(0, (), False, False, False))
        self.inner_step = outcome.step
        sync.distribute(outcome.changed)
        if outcome.checkpoint:
            self.checkpoint()
        self.should_stop = outcome.stop
        return list(outcome.changed)

    def finish(self, *, drain: bool = True) -> None:
        """At the end: resolve the rounds in flight (waiting up to the late bound; with
        ``drain`` False — a stop by signal — abandon them), then checkpoint."""
        sync = self.sync
        if self._worker is None:
            assert sync is not None
            _, touch = sync.plan(0, [])
            sync.gather(touch)
            outcome = sync.outcome(Outcome(0, (), False, False, True))
            sync.distribute(outcome.changed)
            self.checkpoint()
            return
        worker = self.worker
        touch = sorted(worker.in_flight) if drain else []
        if sync is not None:
            sync.plan(self.inner_step, touch)
            sync.gather(touch)
        changed = []
        if drain:
            before = {p: worker.stats.last.get(p) for p in touch}
            worker.drain(self.inner_step)
            changed = [p for p in touch if worker.stats.last.get(p) is not before[p]]
        if sync is not None:
            sync.outcome(Outcome(self.inner_step, tuple(changed), False, False, True))
            sync.distribute(changed)
        self.should_stop = True
        self.publish_figures(None)
        self.checkpoint()
        collective = f"; {sync.collective_s:.2f}s of it intra-site collectives" if sync else ""
        t0, k0 = self._first_step or (time.perf_counter(), self.tokens)
        elapsed = max(1e-9, time.perf_counter() - t0)
        self.site.log.info(
            "outer loop: %.2fs over %d steps in sends, applies and merges%s; "
            "trained %d tokens in %.2fs (%.0f tokens/s)",
            self.outer_s,
            self.inner_step,
            collective,
            self.tokens - k0,
            elapsed,
            (self.tokens - k0) / elapsed,
        )

    # -- state ----------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write the outer state (and ``checkpoint_extra``'s) atomically; report failures.

        Every rank of a multi-rank site calls it at the same step (``checkpoint_extra`` may
        be a collective, e.g. gathering FSDP2 shards); rank 0 writes.
        """
        extra = self.checkpoint_extra() if self.checkpoint_extra is not None else {}
        self._last_checkpoint = time.monotonic()
        if self._worker is None:
            return
        worker = self.worker
        clash = RESERVED_CHECKPOINT_KEYS & set(extra)
        if clash:
            raise ValueError(f"checkpoint_extra may not use the keys {sorted(clash)}")
        with worker.lock:
            payload = {
                "run_config": self.run.as_dict(),
                "step": self.inner_step,
                "tokens": self.tokens,
                "outer": worker.state_dict(),
                **extra,
            }
        try:
            size = save_checkpoint(self.site.cfg.state_dir, payload)
        except CheckpointError as error:
            self.site.log.error("%s", error)
            return
        self.site.log.info("checkpoint at step %d written (%d bytes)", self.inner_step, size)

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.worker.load_state_dict(checkpoint["outer"])
        self.inner_step = int(checkpoint["step"])
        self.tokens = int(checkpoint["tokens"])
        self.site.log.info("resumed from the checkpoint at step %d", self.inner_step)

    def take_run_state(self, *, required: bool) -> bool:
        """θ_g, momentum and step from live peers, then θ ← θ_g (a joiner must; a restarted
        or far-behind peer tries, and keeps its own state if nobody can serve it)."""
        site = self.site
        assert isinstance(site, Site)
        sync = site.state_sync
        assert sync is not None
        try:
            downloaded, progress = sync.download()
        except DownloadError as error:
            if required:
                raise _start_error(f"state download failed: {error}") from error
            self.site.log.warning("state download failed (%s); keeping this peer's state", error)
            return False
        before = self.inner_step
        self.inner_step = sync.adopt(downloaded)
        self.site.log.info(
            "downloaded %d bytes of state from %s in %.2fs (%.1f MB/s); step %d → %d",
            progress.done,
            ", ".join(downloaded.donors_used),
            time.monotonic() - progress.started,
            progress.rate / 1e6,
            before,
            self.inner_step,
        )
        return True

    def load_global_into(self, fragments: Sequence[Fragment]) -> None:
        """Copy θ_g into another model's fragments (an evaluation copy, an export)."""
        worker = self.worker
        with worker.lock:
            for fragment, global_params in zip(fragments, worker.global_params, strict=True):
                assign_flat(fragment.params, global_params)

    # -- catching up and figures ----------------------------------------------------------

    def _catch_up(self, behind_s: float, tokens_per_step: float) -> bool:
        """Skip the step counter ahead after coming late to a group.

        A peer that keeps arriving after its groups closed never contributes. It leaps
        forward by the steps it is behind, but never past the next scheduled sync, so no
        round is skipped; a few late rounds bring it back within the matchmaking window.
        Returns True if it took the run's state instead (θ was reset from θ_g).
        """
        window = self._rate_window
        (t0, k0), (t1, k1) = window[0], window[-1]
        if t1 <= t0 or k1 <= k0 or tokens_per_step <= 0:
            return False
        step_s = (t1 - t0) / ((k1 - k0) / tokens_per_step)
        behind_steps = int(behind_s / step_s)
        run = self.run
        room = next_sync_step(self.inner_step, run.fragments, run.inner_steps) - self.inner_step
        room -= 1
        if behind_steps > run.inner_steps:
            # Far behind: leaping one round at a time would take many late rounds. Take the
            # run's state and step instead of dragging its rounds.
            self.site.log.info(
                "%.1fs (%d steps) behind the run: taking its current state", behind_s, behind_steps
            )
            if self.take_run_state(required=False):
                return True
        leap = min(behind_steps, room)
        if leap > 0:
            self.inner_step += leap
            self.site.log.info(
                "caught up %d step(s) (%.1fs behind the group) to step %d",
                leap,
                behind_s,
                self.inner_step,
            )
        return False

    def _maybe_perturb(self, fragment: int) -> None:
        """Fault injection: damage this peer's θ_g[fragment] after a round (tests of I3)."""
        worker, ctx = self.worker, self.site.ctx
        assert ctx is not None
        record = worker.stats.last.get(fragment)
        if record is not None and ctx.faults.active("perturb-global", fragment, record.round):
            self.site.log.warning(
                "fault injected: perturbing θ_g of fragment %d after round %d",
                fragment,
                record.round,
            )
            with worker.lock:
                worker.global_params[fragment] += 1e-3
                worker.version += 1

    def publish_figures(self, loss: float | None) -> None:
        """The outer loop's figures on the site's status board."""
        worker = self.worker
        window = self._rate_window
        (t0, k0), (t1, k1) = (window[0], window[-1]) if window else ((0.0, 0), (0.0, 0))
        stats = worker.stats
        fragments = []
        for p, fragment in enumerate(worker.fragments):
            record = stats.last.get(p)
            fragments.append(
                FragmentFigures(
                    index=p,
                    round=record.round if record else -1,
                    global_hash=worker.global_hash(p),
                    group_size=record.group_size if record else 0,
                    duration_s=record.duration_s if record else 0.0,
                    outcome=record.outcome if record else "none",
                    numel=fragment.numel,
                )
            )
        figures: dict[str, Any] = {
            "step": self.inner_step,
            "tokens": self.tokens,
            "tokens_per_s": (k1 - k0) / (t1 - t0) if t1 > t0 else 0.0,
            "rounds_applied": stats.rounds_applied,
            "rounds_failed": stats.rounds_failed,
            "rounds_skipped": stats.rounds_skipped,
            "repairs": stats.repairs,
            "waited_s": stats.wait_s,
            "training_s": time.monotonic() - self._began,
            "fragments": fragments,
            "rounds": [
                (r.fragment, r.round, r.group_size, r.duration_s, r.outcome)
                for r in list(stats.history)[-200:]
            ],
        }
        if loss is not None:
            figures["train_loss"] = loss
        self.site.board.update(**figures)
