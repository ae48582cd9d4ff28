"""``python -m bench`` (``make bench``): run every benchmark module's ``main()`` in turn."""

from __future__ import annotations

import importlib
import sys

# Add new benchmark modules here; each has a ``main() -> int`` that prints its table.
MODULES = [
    "bench.interceptor_bench",
]


def main() -> int:
    status = 0
    for name in MODULES:
        status |= importlib.import_module(name).main([])
    return status


if __name__ == "__main__":
    sys.exit(main())
