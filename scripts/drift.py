"""The drift report of `make gen-check`, shared by the generators' --check modes."""

from __future__ import annotations

import sys


def report(stale: list[str], what: str, fresh: str) -> int:
    """Exit status of a --check: 1, listing the ``stale`` files of ``what`` on stderr, when
    there are any; else 0, saying ``fresh``."""
    if stale:
        print(f"{what} is out of date with protos/; run `make gen`:", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        return 1
    print(fresh)
    return 0
