"""``python -m bench`` (``make bench``): run every benchmark module's ``main()`` in turn."""

from __future__ import annotations

import importlib
import sys

# Add new benchmark modules here, with their arguments; each has a ``main(argv)`` that prints
# its table and returns a non-zero status when a target is missed (None counts as success).
# ``--cluster``: the flow (chats, fan-out) and queue rows on a private 3-master Redis Cluster
# too, beside the single Redis's (about half a minute more).
MODULES: list[tuple[str, list[str]]] = [
    ("bench.flow_bench", ["--cluster"]),
    ("bench.queue_bench", ["--cluster"]),
    ("bench.interceptor_bench", []),
    ("bench.batch_bench", []),
    ("bench.plan_bench", []),
    ("bench.scale_bench", []),
]


def main() -> int:
    status = 0
    for name, argv in MODULES:
        print(f"== {name} {' '.join(argv)}".rstrip(), flush=True)
        result = importlib.import_module(name).main(argv)
        status |= int(result or 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
