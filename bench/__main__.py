"""``python -m bench``: run every benchmark module's ``main()`` in turn."""

from __future__ import annotations

import importlib

# Modules under bench/ with a main(); add new benchmarks here.
BENCHMARKS = ["bench.queue_bench"]


def main() -> None:
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        importlib.import_module(name).main()


if __name__ == "__main__":
    main()
