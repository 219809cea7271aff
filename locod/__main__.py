"""``python -m locod`` is the ``locod`` command (so ``torchrun -m locod start`` works)."""

from locod.daemon.cli import main

main()
