"""Generated files match their sources: regenerating changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_regenerating_the_grpc_code_changes_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_configuration_reference_matches_the_settings() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_setting_is_documented_by_name() -> None:
    from locod.daemon.config import START_SETTINGS

    text = (ROOT / "docs" / "configuration.md").read_text()
    for setting in START_SETTINGS:
        if not setting.hidden:
            assert f"`{setting.flag}" in text and f"`{setting.envvar}`" in text, setting.name
