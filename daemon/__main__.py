"""``python -m locod.daemon`` is ``locod`` too."""

from locod.daemon.cli import main

main()
