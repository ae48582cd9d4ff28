"""Plain-text tables and figures for the benchmarks' reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, TypeVar


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Rows of cells, each column as wide as its widest cell; a short row is padded with empty
    cells."""
    columns = max(len(row) for row in rows)
    rows = [(*row, *("",) * (columns - len(row))) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(columns)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def quotient(part: float, whole: float) -> float:
    """``part / whole``, or 0.0 when ``whole`` is nothing (no time, no rate measured)."""
    return part / whole if whole > 0 else 0.0


def fraction(part: float, limit: float) -> str:
    """``part`` as a fraction of the machine's bare grpc.aio ``limit`` for the same shape
    (bench.machine), for a table cell."""
    return f"{part / limit:.3f}" if limit > 0 else "-"


CLUSTER_HEADER = ("measure", "single Redis", "Redis Cluster (3 masters)", "cluster/single")


def print_cluster_rows(rows: Sequence[tuple[str, float, float, str]]) -> None:
    """One row per measure: (name, on single Redis, on the cluster, format) and the quotient
    cluster/single; the cluster's masters share this machine's cores with everything else."""
    print_table(
        [
            CLUSTER_HEADER,
            *(
                (
                    name,
                    format(single, fmt),
                    format(cluster, fmt),
                    f"{quotient(cluster, single):.2f}",
                )
                for name, single, cluster, fmt in rows
            ),
        ]
    )


class Rate:
    """A measurement of things done in ``seconds``: the base of the benchmarks' result
    dataclasses, which name the field holding the count in ``COUNTED``."""

    __slots__ = ()
    COUNTED: ClassVar[str]
    seconds: float

    @property
    def per_second(self) -> float:
        return quotient(getattr(self, self.COUNTED), self.seconds)


R = TypeVar("R", bound=Rate)


def median_run(runs: Sequence[R]) -> R:
    """The run of median rate (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run.per_second)[(len(runs) - 1) // 2]
