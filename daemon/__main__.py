"""``python -m daemon`` is ``locod``."""

from daemon.cli import main

main()
