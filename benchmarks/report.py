"""Writes one benchmark's section of docs/benchmarks.md, leaving the others as they are.

Each benchmark owns the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``;
rerunning it replaces only that text, so every figure in the file stays next to the command
that produced it.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

REPORT_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Every section below was written by a script in `benchmarks/`; the command that
produced it is printed with it. Rerun the command to refresh the section.
Figures are from the machine named in each section; compare ratios, not
absolute times, across machines.
"""


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """A short line naming the machine the figures came from."""
    import os

    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def command_line() -> str:
    """The command that is running now, as a user would type it."""
    return (
        "python -m " + _module_name() + " " + shlex.join(sys.argv[1:])
        if sys.argv[1:]
        else ("python -m " + _module_name())
    )


def _module_name() -> str:
    main = Path(sys.argv[0]).resolve()
    try:
        rel = main.relative_to(REPORT_PATH.parent.parent)
    except ValueError:
        return main.stem
    return ".".join(rel.with_suffix("").parts)


def write_section(
    name: str, title: str, body: str, *, command: str | None = None, path: Path = REPORT_PATH
) -> None:
    """Replace (or append) the section ``name`` of the benchmark report."""
    today = _dt.date.today().isoformat()
    section = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command or command_line()}`  \n"
        f"Machine: {machine_description()}; run on {today}.\n\n{body.strip()}\n"
        f"<!-- /bench:{name} -->"
    )
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
