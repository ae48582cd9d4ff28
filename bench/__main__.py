"""``python -m bench`` (``make bench``): run every benchmark module's ``main()`` in turn."""

from __future__ import annotations

import importlib
import sys

# Add new benchmark modules here; each has a ``main()`` that prints its table and returns a
# non-zero status when a target is missed (None counts as success).
MODULES = [
    "bench.flow_bench",
    "bench.queue_bench",
    "bench.interceptor_bench",
    "bench.batch_bench",
    "bench.plan_bench",
    "bench.scale_bench",
]


def main() -> int:
    status = 0
    for name in MODULES:
        print(f"== {name}", flush=True)
        result = importlib.import_module(name).main()
        status |= int(result or 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
