"""The garbage collector of a serving process, settled once it has started.

CPython's cyclic collector runs a young collection every 700 net allocations of tracked
objects and, now and then, a full one over every object in the process. A serving process
holds ~75,000 objects from its modules (protobuf descriptors, grpc, redis, the generated
stubs) that never become garbage; a full collection walks them all, and under fan-out load
those walks were the latency tail (pauses of 30-250 ms in the fan-out benchmark). Once the
server has started, :func:`settle_heap` collects once, moves every object then alive to the
permanent generation (``gc.freeze()``: never walked again, never freed, as they would not be
anyway) and raises the young threshold (``ORCH_GC_YOUNG_THRESHOLD``), so collections are rare
and walk only what changed since. Objects that die by reference counting (nearly all) are
freed at once as before; cyclic garbage waits at most one young period longer.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def settle_heap(young_threshold: int) -> None:
    """Collect, freeze what is alive and set the young generation's threshold; 0 leaves the
    collector as Python configures it."""
    if young_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
    log.debug("gc: %d objects frozen, young threshold %d", gc.get_freeze_count(), young_threshold)
