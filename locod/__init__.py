"""locod: train one language model across many sites with Streaming DiLoCo.

Your model, your optimizer, your data loader; locod runs the site (DHT, gRPC, rounds,
status, checkpoints of the outer state, joining, repair) in the background::

    import locod

    with locod.join(run="my-run", join=["host:7850"]) as site:  # or locod.found(run=...)
        outer = site.streaming_diloco(model, inner_steps=100, fragments=8)
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            outer.step(tokens=batch["input_ids"].numel())

``found``/``join`` take the site settings of ``locod start`` by name (``state_dir``,
``listen``, ``announce``, timeouts, ...; see docs/configuration.md), ``streaming_diloco``
its algorithm settings (``inner_steps``, ``fragments``, ``overlap``, ``alpha``,
``outer_lr``, ``wire``, ...). ``locod start`` itself is a client of this API.

This is the installed package's only top-level name: ``locod.peer`` (the algorithm, no
network) and ``locod.daemon`` (how peers meet and talk) are the repository's ``peer/`` and
``daemon/`` folders, linked here. Importing ``locod`` is light: the heavy modules load on
first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from locod.daemon.distributed import FollowerSite
    from locod.daemon.outer_loop import OuterLoop
    from locod.daemon.site import Site, StartError

__all__ = ["OuterLoop", "Site", "StartError", "found", "join"]


def found(run: str = "locod-demo", **settings: Any) -> Site | FollowerSite:
    """A site that starts a new run named ``run`` (use it in a ``with`` block).

    Under torch.distributed (a site of many ranks), call it on every rank: rank 0 gets
    the site, the other ranks a stand-in that takes part in the site's collectives.
    """
    if settings.get("join"):
        raise TypeError("found() starts a new run; to join one, use locod.join(..., join=[...])")
    return _site(run=run, **settings)


def join(run: str, join: str | Sequence[str], **settings: Any) -> Site | FollowerSite:
    """A site that joins the run ``run`` through ``join``: peers' ``HOST:PORT`` gRPC
    addresses or DHT multiaddrs (use it in a ``with`` block; on every rank of a site)."""
    addresses = (join,) if isinstance(join, str) else tuple(join)
    if not addresses:
        raise TypeError("join() needs at least one peer of the run to join through")
    return _site(run=run, join=addresses, **settings)


def _site(**settings: Any) -> Site | FollowerSite:
    from locod.daemon.config import site_config
    from locod.daemon.distributed import FollowerSite, group_of_initialized
    from locod.daemon.site import Site

    cfg = site_config(**settings)
    ranks = group_of_initialized()
    if ranks is not None and not ranks.leader:
        return FollowerSite(cfg, ranks)
    return Site(cfg)


def __getattr__(name: str) -> Any:
    """``locod.Site``, ``locod.OuterLoop`` and ``locod.StartError``, imported on first use."""
    if name in ("Site", "StartError"):
        from locod.daemon import site

        return getattr(site, name)
    if name == "OuterLoop":
        from locod.daemon.outer_loop import OuterLoop

        return OuterLoop
    raise AttributeError(f"module 'locod' has no attribute {name!r}")
