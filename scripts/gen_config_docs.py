"""Write docs/configuration.md from the settings table: ``python scripts/gen_config_docs.py``.

``--check`` fails if the committed file differs from what the settings say (tests and
./test.sh run it), so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from locod.daemon.config import DAEMON  # noqa: E402
from locod.daemon.settings import ALGORITHM, Setting  # noqa: E402

TARGET = ROOT / "docs" / "configuration.md"

INTRO = """# Configuration reference

Generated from `daemon/settings.py` and `daemon/config.py` by
`python scripts/gen_config_docs.py`; a test fails if this file and the code disagree.

Every setting can be given three ways. Highest precedence first:

1. a command-line flag, e.g. `--inner-steps 50`;
2. an environment variable, e.g. `LOCOD_INNER_STEPS=50` (never overrides a flag);
3. a key in the TOML file passed with `--config`, e.g. `inner_steps = 50`.

`locod start --check` prints the effective value of every setting and where it came
from, then exits. The daemon logs the effective config when it starts.

**Scope.** *run* settings form the run config: the first peer publishes them and every
joiner adopts them; a joiner that sets one of them to a different value is refused with a
message naming each differing setting. *peer* settings may differ between peers (a fast
and a slow machine may use different batch sizes).
"""


def _type_name(setting: Setting) -> str:
    if setting.is_flag:
        return "flag"
    kind: Any = setting.type
    choices = getattr(kind, "choices", None)
    if choices:
        return " \\| ".join(f"`{c}`" for c in choices)
    name = getattr(kind, "__name__", None) or getattr(kind, "name", "value")
    name = {"str": "text", "int": "integer", "float": "number", "path": "path"}.get(name, name)
    return f"{name} (repeatable)" if setting.multiple else name


def _default(setting: Setting) -> str:
    value = setting.default
    if setting.is_flag:
        return f"`{'on' if value else 'off'}`"
    if value in (None, (), ""):
        return "—"
    return f"`{value}`"


def _flag(setting: Setting) -> str:
    return (
        f"`{setting.flag}` / `--no-{setting.flag[2:]}`" if setting.is_flag else f"`{setting.flag}`"
    )


def _table(settings: tuple[Setting, ...]) -> str:
    rows = [
        "| flag | env | TOML key | type | default | scope | meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        if s.hidden:
            continue
        rows.append(
            f"| {_flag(s)} | `{s.envvar}` | `{s.name}` | {_type_name(s)} | "
            f"{_default(s)} | {s.scope} | {s.help} |"
        )
    return "\n".join(rows)


def render() -> str:
    return (
        INTRO
        + "\n## The algorithm (`locod start` and `locod simulate`)\n\n"
        + _table(ALGORITHM)
        + "\n\n`locod simulate` uses the same settings with shorter-run defaults "
        "(`--inner-steps 25`, `--warmup-steps 20`, cosine decay over `--steps`), plus "
        "`--peers`, `--method`, `--steps`, `--eval-every`, `--eval-batches`, "
        "`--final-sync` and `--json` (see `locod simulate --help`).\n"
        + "\n## The daemon (`locod start`)\n\n"
        + _table(DAEMON)
        + "\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    options = parser.parse_args()
    text = render()
    if options.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(
                "docs/configuration.md is out of date: run python scripts/gen_config_docs.py",
                file=sys.stderr,
            )
            return 1
        return 0
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
    print(TARGET.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
