"""peer/ computes; it never touches the network (DESIGN §2). Every import names ``locod``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("grpc", "hivemind", "asyncio", "locod.daemon")
SOURCE_FOLDERS = ("peer", "daemon", "locod", "tests", "benchmarks", "scripts", "examples")


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, in full (``a.b.c``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_peer_sources_do_not_import_network_modules() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _imported_modules(path) if _matches(m, FORBIDDEN)
        )
        for path in (ROOT / "peer").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_source_imports_peer_or_daemon_outside_locod() -> None:
    """``peer`` and ``daemon`` are folders of the repository, not packages of the wheel:
    importing them by those names would load a second copy of every module."""
    offenders = {}
    for folder in SOURCE_FOLDERS:
        base = ROOT / folder
        if not base.is_dir() or base.is_symlink():
            continue
        for path in base.rglob("*.py"):
            if "rpc" in path.parts:
                continue
            bad = sorted(m for m in _imported_modules(path) if _matches(m, ("peer", "daemon")))
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_importing_every_peer_module_loads_no_network_module() -> None:
    modules = sorted(
        "locod.peer." + path.stem
        for path in (ROOT / "peer").glob("*.py")
        if path.stem != "__init__"
    )
    # torch itself imports asyncio; what matters is what peer/ adds on top of its dependencies.
    script = (
        "import sys, numpy, torch, zstandard\n"
        "before = set(sys.modules)\n"
        f"for name in {modules!r}: __import__(name)\n"
        "added = set(sys.modules) - before\n"
        f"prefixes = {FORBIDDEN!r}\n"
        "bad = sorted(m for m in added if any(m == p or m.startswith(p + '.') for p in prefixes))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
