"""The wheel: its only top-level import name is locod; installed in a fresh virtualenv, it
runs ``locod start --check`` and imports from the install, not from the repository."""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_wheel_installs_alone_and_exposes_only_locod(tmp_path: Path) -> None:
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-w", tmp_path / "dist", ROOT, cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("locod-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"locod"}, top
    assert "locod/peer/streaming.py" in names and "locod/daemon/site.py" in names

    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    # The dependencies (torch, grpcio, hivemind...) come from this interpreter's
    # site-packages, read as a plain path (its .pth files, among them the editable install
    # of this repository, are not processed); locod itself only from the wheel.
    purelib = Path(
        _run(
            venv / "bin" / "python",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            cwd=tmp_path,
        ).stdout.strip()
    )
    ours = [p for p in site.getsitepackages() if Path(p).exists()] or [
        sysconfig.get_paths()["purelib"]
    ]
    (purelib / "zz_dependencies.pth").write_text("\n".join(ours) + "\n")
    installed = _run(
        venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel,
        cwd=tmp_path,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]

    where = _run(
        venv / "bin" / "python", "-c",
        "import locod, locod.peer.streaming, locod.daemon.site; print(locod.__file__)",
        cwd=tmp_path,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    check = _run(venv / "bin" / "locod", "start", "--check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "configuration is valid" in check.stdout
