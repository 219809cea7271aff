"""Atomic checkpoints in the state dir: written whole or not at all.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the previous one, so a crash or a full disk mid-write leaves the previous
checkpoint intact. A failed write is reported, never fatal: training goes on.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2
"""2: model and optimizer state keyed by parameter name (torch.distributed.checkpoint's
full state dicts), so a site of any number of ranks can resume it."""


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says why."""


def checkpoint_path(state_dir: Path) -> Path:
    return state_dir / CHECKPOINT_NAME


def save_checkpoint(state_dir: Path, payload: dict[str, Any]) -> int:
    """Write ``payload`` atomically; returns its size in bytes."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **payload}, buffer)
    data = buffer.getvalue()
    target = checkpoint_path(state_dir)
    try:
        fd, temp_name = tempfile.mkstemp(dir=state_dir, prefix=".checkpoint-", suffix=".tmp")
    except OSError as error:
        raise CheckpointError(f"cannot write a checkpoint in {state_dir}: {error}") from error
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise CheckpointError(
            f"checkpoint not written ({error}); the previous one is kept"
        ) from error
    return len(data)


def load_checkpoint(state_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint, or None if there is none; CheckpointError if it is unreadable."""
    path = checkpoint_path(state_dir)
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is not a locod checkpoint of format {FORMAT_VERSION}"
        )
    return payload
