"""peer/ computes; it never touches the network (DESIGN §2)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("grpc", "hivemind", "asyncio", "daemon")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_peer_sources_do_not_import_network_modules() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_modules(path) & set(FORBIDDEN))
        for path in (ROOT / "peer").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_peer_module_loads_no_network_module() -> None:
    modules = sorted(
        "peer." + path.stem for path in (ROOT / "peer").glob("*.py") if path.stem != "__init__"
    )
    # torch itself imports asyncio; what matters is what peer/ adds on top of its dependencies.
    script = (
        "import sys, numpy, torch, zstandard\n"
        "before = set(sys.modules)\n"
        f"for name in {modules!r}: __import__(name)\n"
        "added = set(sys.modules) - before\n"
        f"bad = sorted(m for m in added if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
