"""locod's daemon: how peers meet and talk, and the process around the algorithm.

Map of the package, bottom layer first:

* ``settings``, ``config`` — every setting once (flags, ``LOCOD_*``, TOML, docs);
  ``SiteConfig`` (a site's network side), ``RunConfig`` (what every peer shares),
  ``DaemonConfig`` (``locod start``).
* ``discovery`` — hivemind's DHT: signed peer records and the run config.
* ``auth``, ``context`` — proof of a private run's key; one site's identity, peers seen,
  channels and counters.
* ``matchmaking`` — group agreement for one round; ``allreduce`` — one round's butterfly
  all-reduce; ``averager`` — ``peer.averaging.Averager`` over those two.
* ``state_transfer`` — snapshots served in hashed chunks, multi-donor download;
  ``state_sync`` — snapshots, downloads and repairs of an attached model's outer state.
* ``service``, ``status``, ``network`` — the gRPC services and the network thread.
* ``membership`` — this site's record and its view of the run (refresh, reachability).
* ``site`` — :class:`Site`: one peer's network side, start to stop (the library API's
  ``locod.found``/``locod.join``).
* ``outer_loop`` — :class:`OuterLoop`: Streaming DiLoCo around any model on a site
  (``site.streaming_diloco(model, ...)``), stepped by the user's loop or the trainer.
* ``trainer`` — ``locod start``'s built-in training loop, a client of the API.
* ``node`` — the ``locod start`` process: logging, signals, site and trainer.
* ``cli`` — the ``locod`` command; ``live``, ``checkpoint``, ``faults``, ``resolve``,
  ``info`` — the terminal view, atomic checkpoints, fault injection, ``--join HOST:PORT``,
  the daemon's info file.

The algorithm itself lives in :mod:`locod.peer`, which never imports anything from here.
"""
