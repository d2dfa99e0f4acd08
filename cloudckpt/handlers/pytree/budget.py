"""A byte budget bounding the data in flight between host memory and storage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    """At most ``limit`` bytes held at once; one request larger than the limit runs alone."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"the in-flight byte limit must be positive, got {limit}")
        self.limit = limit
        self._used = 0
        self._cond = asyncio.Condition()
        self.peak = 0

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: self._used == 0 or self._used + nbytes <= self.limit)
            self._used += nbytes
            self.peak = max(self.peak, self._used)
        try:
            yield
        finally:
            async with self._cond:
                self._used -= nbytes
                self._cond.notify_all()
