"""The Docker image and compose file, checked without a Docker engine (none runs here):
every service's command must pass ``locod start --check``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from locod.daemon.cli import locod

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_compose_has_a_first_peer_two_joiners_and_a_late_volunteer() -> None:
    services = _compose()["services"]
    assert set(services) == {"first", "second", "third", "volunteer"}
    assert "--join" not in services["first"]["command"]
    for name in ("second", "third", "volunteer"):
        command = services[name]["command"]
        assert command[command.index("--join") + 1] == "first:7850", name
    assert "sleep" in " ".join(services["volunteer"]["entrypoint"])
    for name, service in services.items():
        assert any(v.endswith(":/state") for v in service["volumes"]), name


@pytest.mark.parametrize("service", ["first", "second", "third", "volunteer"])
def test_every_compose_command_is_a_valid_locod_start(service: str, tmp_path: Path) -> None:
    command = _compose()["services"][service]["command"]
    assert command[0] == "start"
    args = [arg.replace("/state", str(tmp_path / "state")) for arg in command[1:]]
    result = CliRunner().invoke(locod, ["start", *args, "--check"])
    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.output


def test_dockerfile_runs_locod_with_a_grpc_health_check(tmp_path: Path) -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["locod"]' in text
    assert re.search(r'HEALTHCHECK .*\n?.*"locod", "health"', text)
    assert "ARG BASE=" in text  # a CUDA base can be chosen at build time
    cmd = re.search(r"^CMD \[(.*?)\]", text, re.S | re.M)
    assert cmd is not None
    args = [a.strip().strip('"') for a in cmd.group(1).replace("\\\n", " ").split(",")]
    args = [a.replace("/state", str(tmp_path / "state")) for a in args]
    result = CliRunner().invoke(locod, [*args, "--check"])
    assert result.exit_code == 0, result.output
