"""locod: train one language model across many sites with Streaming DiLoCo.

The installed package's only top-level name. ``locod.peer`` (the algorithm, no network)
and ``locod.daemon`` (how peers meet and talk) are the repository's ``peer/`` and
``daemon/`` folders, linked here so that every import reads ``locod.…`` in the source tree
and in an installed wheel alike.
"""
