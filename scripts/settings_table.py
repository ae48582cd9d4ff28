"""Print (or, with --write, update in README.md) the configuration table from server.config."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.config import Settings  # noqa: E402

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def table() -> str:
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, default, help_text in Settings.documentation():
        rows.append(f"| `{name}` | {f'`{default}`' if default else '(unset)'} | {help_text} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    return pattern.sub(f"{START}\n{table()}\n{END}", readme)


def main() -> int:
    path = ROOT / "README.md"
    if "--write" in sys.argv:
        path.write_text(readme_with_table(path.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
