"""``locod start``: one site's daemon process, from start-up to a clean stop.

The process wraps a :class:`~locod.daemon.site.Site` (the network side) and the built-in
:class:`~locod.daemon.trainer.Trainer` (the training loop, a client of the library API):

1. lock the state dir, open the log file and the terminal view, install signal handlers;
2. load the corpus (a bad ``--data`` fails before anything slow);
3. start the site (DHT, then gRPC: gRPC and fork do not mix), print the join command;
4. train until ``--max-steps`` or a signal;
5. stop: rounds in flight are abandoned, a checkpoint is written atomically, the peer says
   it leaves, and the server, the network thread and the DHT stop.

SIGINT/SIGTERM stop the daemon within seconds; a second signal exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import TextIO

from locod.daemon.config import DaemonConfig
from locod.daemon.distributed import FollowerSite, RankGroup, init_ranks, launched_ranks
from locod.daemon.live import LiveView
from locod.daemon.site import Site, StartError, package_version, state_dir_lock
from locod.daemon.trainer import Trainer

__all__ = ["Daemon", "StartError"]


def setup_logging(cfg: DaemonConfig, console: bool) -> logging.Logger:
    log = logging.getLogger("locod")
    log.setLevel(cfg.site.log_level.upper())
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    file_handler = logging.FileHandler(cfg.site.state_dir / "locod.log")
    file_handler.setFormatter(formatter)
    log.addHandler(file_handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        stream.setLevel(max(logging.INFO, log.level))
        log.addHandler(stream)
    return log


class Daemon:
    """The ``locod start`` process: a site and the built-in trainer on it."""

    def __init__(self, cfg: DaemonConfig, *, out: TextIO | None = None) -> None:
        self.cfg = cfg
        self.out = out or sys.stdout
        self.stop_event = threading.Event()
        self.log = logging.getLogger("locod")
        self.site: Site | None = None
        self._signals = 0

    def run(self) -> int:
        ranks = launched_ranks()
        if ranks is not None and not ranks.leader:
            return self._run_follower(ranks)
        cfg = self.cfg
        with state_dir_lock(cfg.site.state_dir):
            view = LiveView(enabled=cfg.live)
            self.log = setup_logging(cfg, console=not view.interactive)
            self.log.info(
                "locod %s starting; effective config: %s",
                package_version(),
                json.dumps(cfg.loggable(), sort_keys=True, default=str),
            )
            self._install_signals()
            trainer = Trainer(cfg, stop=self.stop_event, view=view, log=self.log, ranks=ranks)
            self.site = site = Site(cfg.site, log=self.log, lock_state_dir=False)
            try:
                trainer.load_corpus()
                site.start()
                if ranks is not None:
                    init_ranks(trainer.device, cfg.rank_timeout_s)
                ctx = site.ctx
                assert ctx is not None
                site.redraw = lambda: view.update(site.board, ctx)
                local = site.listen_address.replace("0.0.0.0:", "127.0.0.1:")
                view.message(
                    f"locod: peer {ctx.peer_id} in run {cfg.site.run_name!r}; gRPC "
                    f"{ctx.address or '(client-only)'}; status: locod status {local}"
                )
                if not cfg.site.join:
                    join_command = site.join_command()
                    view.message(f"locod: another site joins this run with:\n  {join_command}")
                    print(f"JOIN {join_command}", file=self.out, flush=True)
                trainer.run(site)
            finally:
                began = time.monotonic()
                site.stop()
                self.log.info(
                    "stopped in %.1fs%s",
                    time.monotonic() - began,
                    f" ({trainer.why_stopped})" if trainer.why_stopped else "",
                )
                for handler in list(self.log.handlers):
                    handler.flush()
        return 0

    def _run_follower(self, ranks: RankGroup) -> int:
        """A rank other than 0 of a torchrun site: train, follow rank 0, no network."""
        cfg = self.cfg
        cfg.site.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger("locod")
        self.log.setLevel(cfg.site.log_level.upper())
        self.log.propagate = False
        handler = logging.FileHandler(cfg.site.state_dir / f"locod.rank{ranks.rank}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(handler)
        # Rank 0 decides when the site stops (every rank must stop at the same step);
        # a signal here only ends the process if it comes twice.
        self._install_signals()
        view = LiveView(enabled=False)
        trainer = Trainer(cfg, stop=self.stop_event, view=view, log=self.log, ranks=ranks)
        trainer.load_corpus()
        init_ranks(trainer.device, cfg.rank_timeout_s)
        trainer.run(FollowerSite(cfg.site, ranks, log=self.log))
        return 0

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self._signals += 1
            if self._signals > 1:
                os._exit(130)  # a second Ctrl-C: the user means it
            self.log.info("received %s: stopping", signal.Signals(signum).name)
            self.stop_event.set()
            if self.site is not None and self.site.averager is not None:
                self.site.averager.abandon_all()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
