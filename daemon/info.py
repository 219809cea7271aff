"""What a running daemon writes about itself in its state dir, for ``locod status``/``stop``.

Plain JSON next to the checkpoint, written atomically; reading it needs nothing heavier
than the standard library, so the commands that only look at a daemon start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INFO_FILE = "daemon.json"


def write_info(state_dir: Path, info: dict[str, Any]) -> None:
    temp = state_dir / (INFO_FILE + ".tmp")
    temp.write_text(json.dumps(info))
    temp.replace(state_dir / INFO_FILE)


def read_info(state_dir: Path) -> dict[str, Any] | None:
    """What a running daemon wrote about itself in its state dir, or None."""
    try:
        return dict(json.loads((state_dir / INFO_FILE).read_text()))
    except (OSError, ValueError):
        return None
