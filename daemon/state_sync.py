"""Moving outer state between this site and the run: snapshots served, downloads, repair.

* ``snapshot`` — a consistent copy of θ_g and the outer momentum of the attached model,
  taken under the outer state's lock (called from the network side to serve a joiner).
* ``download`` — a newcomer (or a restarted or far-behind peer) takes the run's current
  outer state and step from live peers, in verified chunks (:mod:`state_transfer`), then
  sets θ ← θ_g.
* ``repair`` — a peer whose θ_g[p] differs from its group's fetches the group's copy of
  that one fragment (invariant I3).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import torch

from locod.daemon.context import PeerContext
from locod.daemon.membership import Membership
from locod.daemon.network import NetworkThread
from locod.daemon.rpc import peer_pb2 as pb
from locod.daemon.state_transfer import (
    Downloaded,
    DownloadError,
    Progress,
    Snapshot,
    download_state,
    tensor_bytes,
)
from locod.daemon.status import StatusBoard
from locod.peer.averaging import FragmentState
from locod.peer.streaming import StreamingDiLoCo


class StateSync:
    """Snapshots, downloads and repairs of one attached model's outer state."""

    def __init__(
        self,
        ctx: PeerContext,
        worker: StreamingDiLoCo,
        membership: Membership,
        network: NetworkThread,
        board: StatusBoard,
        log: logging.Logger,
        *,
        config_json: str,
        step: Callable[[], int],
        redraw: Callable[[], None] = lambda: None,
    ) -> None:
        self.ctx = ctx
        self.worker = worker
        self.membership = membership
        self.network = network
        self.board = board
        self.log = log
        self.config_json = config_json
        self.step = step
        self.redraw = redraw

    def snapshot(self, fragments: list[int]) -> Snapshot:
        """A consistent copy of the outer state (called from the network side)."""
        worker = self.worker
        wanted = fragments or list(range(worker.num_fragments))
        with worker.lock:
            tensors = {}
            for p in wanted:
                tensors[f"global/{p}"] = tensor_bytes(worker.global_params[p])
                tensors[f"momentum/{p}"] = tensor_bytes(worker.momentum[p])
            rounds = [
                worker.stats.last[p].round if p in worker.stats.last else -1
                for p in range(worker.num_fragments)
            ]
            hashes = [worker.global_hash(p) for p in range(worker.num_fragments)]
            version = worker.version
        return Snapshot(
            version=version,
            step=self.step(),
            rounds=rounds,
            global_hashes=hashes,
            config_json=self.config_json,
            tensors=tensors,
        )

    def donors(self) -> list[str]:
        ctx = self.ctx
        return [r.address for r in ctx.ready_peers() if r.peer_id != ctx.peer_id and r.address]

    def download(self) -> tuple[Downloaded, Progress]:
        """The run's current outer state from live peers, and how the download went;
        DownloadError if nobody serves it.

        Blocking (the training thread waits for it); progress goes to the status board.
        """
        previous_state = self.board.state
        self.board.update(state="downloading state")
        self.membership.refresh_now()
        donors = self.donors()
        if not donors:
            self.board.update(state=previous_state)
            raise DownloadError(
                "no live peer with a reachable address to download the state from; "
                "is the run still going?"
            )
        progress = Progress()

        async def fetch() -> Downloaded:
            task = asyncio.ensure_future(download_state(self.ctx, donors, progress=progress))
            while not task.done():
                self.board.update(
                    download_done=progress.done,
                    download_total=progress.total,
                    note=f"{progress.rate / 1e6:.1f} MB/s, {progress.eta_s:.0f}s left"
                    if progress.total
                    else "asking donors",
                )
                self.redraw()
                await asyncio.sleep(0.2)
            self.board.update(note="")
            return task.result()

        try:
            downloaded = self.network.call(fetch(), timeout_s=None)
        finally:
            self.board.update(
                download_done=progress.done,
                download_total=progress.total,
                state=previous_state,
            )
        return downloaded, progress

    def adopt(self, downloaded: Downloaded) -> int:
        """Take a downloaded state as this peer's outer state, set θ ← θ_g; returns its step."""
        manifest: pb.StateManifest = downloaded.manifest
        tensors: dict[str, torch.Tensor] = downloaded.tensors
        worker = self.worker
        for p in range(worker.num_fragments):
            worker.adopt(
                p,
                FragmentState(
                    global_params=tensors[f"global/{p}"], momentum=tensors[f"momentum/{p}"]
                ),
            )
            worker.mark_round(p, int(manifest.rounds[p]))
        worker.reset_local_to_global()
        return int(manifest.step)

    async def repair(
        self, fragment: int, round_index: int, majority_hash: str
    ) -> tuple[FragmentState, bool] | None:
        """Fetch the group's state of one fragment from a peer that holds it (I3)."""
        for donor in self.donors():
            try:
                got = await download_state(self.ctx, [donor], fragments=[fragment])
            except DownloadError as error:
                self.log.info(
                    "repair of fragment %d: %s could not serve it: %s", fragment, donor, error
                )
                continue
            state = FragmentState(
                global_params=got.tensors[f"global/{fragment}"],
                momentum=got.tensors[f"momentum/{fragment}"],
            )
            if got.manifest.global_hashes[fragment] == majority_hash:
                self.log.info(
                    "repair of fragment %d: took the group's state from %s", fragment, donor
                )
                return state, False
            if got.manifest.rounds[fragment] == round_index:
                self.log.info(
                    "repair of fragment %d: took the post-round state from %s", fragment, donor
                )
                return state, True
            self.log.info(
                "repair of fragment %d: %s holds %s after round %d, neither the group's %s "
                "nor round %d",
                fragment,
                donor,
                got.manifest.global_hashes[fragment],
                got.manifest.rounds[fragment],
                majority_hash,
                round_index,
            )
        return None


def config_json(run_config: dict[str, Any]) -> str:
    return json.dumps(run_config, sort_keys=True)
