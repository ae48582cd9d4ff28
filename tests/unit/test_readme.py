"""The README's configuration table matches the settings the code reads."""

from __future__ import annotations

from pathlib import Path

from scripts.settings_table import readme_with_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_table_is_current() -> None:
    text = README.read_text()
    assert readme_with_table(text) == text, "run `python scripts/settings_table.py --write`"
