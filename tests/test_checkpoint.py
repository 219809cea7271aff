"""Checkpoints are atomic: a failed write (full disk) keeps the previous one."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from locod.daemon.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    size = save_checkpoint(tmp_path, {"step": 3, "tensor": torch.arange(4.0)})
    loaded = load_checkpoint(tmp_path)
    assert size > 0 and loaded is not None
    assert loaded["step"] == 3 and torch.equal(loaded["tensor"], torch.arange(4.0))


def test_a_full_disk_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, {"step": 1})

    def no_space(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(tmp_path, {"step": 2})
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)
