"""What work over millions of rows in one process shares: the collector kept out of its way.

A bulk job (a mirror rebuild, an import) makes tens of thousands of container objects a page or a
chunk, alive until that page is written, and keeps growing ones (an import remembers every card
number and citizen ID of its file). With Python's default, a young pass every 700 allocations, those
were traversed again and again and promoted, and full passes followed over an ever larger heap:
40 % of a rebuild's CPU (10.1 against 6.3 µs a card with the collector off, loadtests/mirror_rebuild.py
at 1 M cards), and an import's CPU per row grew with the file.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Container allocations between the collector's young passes while a bulk job runs.
BULK_GC_THRESHOLD = 50_000

_deferred: list[tuple[int, int, int]] = []


@contextlib.contextmanager
def fewer_collections(threshold: int = BULK_GC_THRESHOLD) -> Iterator[None]:
    """Within the block, the collector's young pass runs after `threshold` allocations instead of the
    default's 700; its other settings stay. Cycles are still collected, a little later: a worker
    refilling the store keeps serving meanwhile. Blocks may overlap (tasks of one process): the settings
    of before the first are back when the last one ends."""
    if not _deferred:
        before = gc.get_threshold()
        gc.set_threshold(max(before[0], threshold), before[1], before[2])
    else:
        before = _deferred[0]
    _deferred.append(before)
    try:
        yield
    finally:
        _deferred.pop()
        if not _deferred:
            gc.set_threshold(*before)
