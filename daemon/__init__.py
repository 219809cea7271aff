"""locod's daemon: how peers meet and talk, and the process around the algorithm.

Map of the package (one layer per module):

* ``cli`` — the ``locod`` command (click): ``simulate``, and later ``start`` and ``status``.
* ``options`` — the algorithm's click options, shared by every command that trains, as
  thin layers over the typed configs of :mod:`peer`.

The algorithm itself lives in :mod:`peer`, which never imports anything from here.
"""
