"""Regenerate daemon/rpc/ from protos/: ``python scripts/gen_protos.py``.

grpc_tools writes absolute imports (``from locod.v1 import peer_pb2``) that only work
with protos/ on sys.path; we rewrite them to relative imports so the generated modules
live inside the ``daemon.rpc`` package. ``--check`` regenerates into a temporary folder
and fails if the result differs from what is committed (tests run it).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUTPUT = ROOT / "daemon" / "rpc"
HEADER = '"""Generated from protos/ by scripts/gen_protos.py. Do not edit."""\n'


def generate(destination: Path) -> list[Path]:
    """Write the generated modules into ``destination``; return the files written."""
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as raw:
        include = str(Path(protoc.__file__).parent / "_proto")
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={raw}",
            f"--grpc_python_out={raw}",
            f"--pyi_out={raw}",
            *map(str, protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        destination.mkdir(parents=True, exist_ok=True)
        written = []
        for source in sorted(Path(raw).rglob("*")):
            if source.suffix not in (".py", ".pyi"):
                continue
            text = source.read_text()
            text = re.sub(r"^from locod\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
            target = destination / source.name
            target.write_text(text)
            written.append(target)
        (destination / "__init__.py").write_text(HEADER)
        written.append(destination / "__init__.py")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if regenerating changes files")
    options = parser.parse_args()
    if not options.check:
        if OUTPUT.exists():
            shutil.rmtree(OUTPUT)
        for path in generate(OUTPUT):
            print(path.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        fresh = generate(Path(scratch))
        names = sorted(p.name for p in fresh)
        committed = sorted(p.name for p in OUTPUT.glob("*.py*"))
        stale = (
            [n for n in names if not filecmp.cmp(Path(scratch) / n, OUTPUT / n, shallow=False)]
            if set(names) <= set(committed)
            else names
        )
        extra = sorted(set(committed) - set(names))
        if stale or extra:
            print(
                f"daemon/rpc is out of date: {', '.join(stale + extra)}; "
                "run python scripts/gen_protos.py",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
