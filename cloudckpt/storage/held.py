"""Time a read spent waiting for its consumer, which its deadline and hedge leave out.

A restore's read into a sink (``cloudckpt.handlers.pytree.scatter.Scatter``)
waits in the sink's ``room`` while the placing threads catch up. That time is
the restore's, not the store's: counted as the store's, it made reads look
slow, and they were hedged and cut (issue 18). A sink keeps a
:class:`HeldClock`; :func:`held` sums the clocks of a read's sinks for the
deadline layer (``cloudckpt.storage.deadline``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any


class HeldClock:
    """The seconds a sink has made its readers wait so far, the wait under way included."""

    def __init__(self) -> None:
        self._total = 0.0
        self._since: float | None = None  # when the wait under way began

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Counts the time spent inside the block (one wait at a time)."""
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._total += time.monotonic() - self._since
            self._since = None

    @property
    def seconds(self) -> float:
        since = self._since
        return self._total + (time.monotonic() - since if since is not None else 0.0)


def held(buffers: list[Any]) -> Callable[[], float] | None:
    """The seconds a read into ``buffers`` has waited for its sinks' room so far (None: no sink)."""
    sinks = [b for b in buffers if not isinstance(b, memoryview) and hasattr(b, "held_s")]
    if not sinks:
        return None
    return lambda: sum(s.held_s for s in sinks)
