"""Bounding a single slow request: per-request deadlines and hedged reads.

A pod-scale save is as slow as its slowest request. A request that stalls
(a wedged connection, a dead storage node) never fails on its own, so without
a deadline it holds the whole step; with one it becomes a transient failure
that the retry policy (:mod:`cloudckpt.storage.retry`) repeats on a fresh
connection. A read that is merely slow is *hedged*: a second, identical
request starts after a delay and the first answer wins.

Both are sized from the bytes requested, so large transfers are not cut short:

* deadline of one attempt = ``floor_s + nbytes / min_rate_bps``;
* hedge delay = ``hedge_floor_s + nbytes / hedge_rate_bps``.

Two HTTP clients carry cloudckpt's bytes and each gets the bound its own way:

* the backends (s3fs/gcsfs: metadata, markers, small objects): every attempt
  runs under its deadline here, and ``get`` is hedged;
* tensorstore (array chunks and packs) has no per-request timeout option; its
  curl transport aborts a transfer slower than
  ``TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES`` per second over
  ``TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS``, which is the same bound (a
  stalled request is cut after ``floor_s``, one moving at ``min_rate_bps`` is
  never cut), and retries the aborted request under its
  ``*_request_retries`` context resource. tensorstore reads these variables
  once per process, at its first HTTP request, so :func:`configure_tensorstore`
  sets them (unless the user has) before cloudckpt opens anything; reads of
  array regions are hedged by the pytree handler with :func:`hedged`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)

_TS_TIME = "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"
_TS_LIMIT = "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES"


@dataclass(frozen=True)
class Deadlines:
    """How long one request may take, and when a read is hedged.

    Attributes:
        floor_s: Seconds any attempt may take however small; also how long a
            tensorstore transfer may make no progress before it is cut.
        min_rate_bps: The slowest transfer rate (bytes/s) not treated as a stall.
        hedge_floor_s: Seconds before a read gets a second, hedging request.
        hedge_rate_bps: Expected rate (bytes/s) that sizes the hedge delay of
            large reads.
        hedge: Whether reads are hedged at all.
    """

    floor_s: float = 20.0
    min_rate_bps: float = 256 * 1024
    hedge_floor_s: float = 5.0
    hedge_rate_bps: float = 32 * 1024 * 1024
    hedge: bool = True

    def __post_init__(self) -> None:
        if self.floor_s <= 0 or self.min_rate_bps <= 0:
            raise ValueError(
                f"Deadlines needs floor_s > 0 and min_rate_bps > 0, got {self.floor_s} and "
                f"{self.min_rate_bps}"
            )
        if self.hedge_floor_s < 0 or self.hedge_rate_bps <= 0:
            raise ValueError(
                f"Deadlines needs hedge_floor_s >= 0 and hedge_rate_bps > 0, got "
                f"{self.hedge_floor_s} and {self.hedge_rate_bps}"
            )

    def request_s(self, nbytes: int) -> float:
        """The deadline of one attempt moving ``nbytes``."""
        return self.floor_s + max(nbytes, 0) / self.min_rate_bps

    def hedge_after_s(self, nbytes: int) -> float:
        """How long a read of ``nbytes`` runs alone before it is hedged."""
        return self.hedge_floor_s + max(nbytes, 0) / self.hedge_rate_bps


#: The deadlines object-store backends use unless given others.
DEFAULT_DEADLINES = Deadlines()


def tensorstore_environment(deadlines: Deadlines) -> dict[str, str]:
    """The environment that gives tensorstore's HTTP transport ``deadlines``' stall bound."""
    return {
        _TS_TIME: str(max(1, round(deadlines.floor_s))),
        _TS_LIMIT: str(max(1, int(deadlines.min_rate_bps))),
    }


_warned: set[tuple[tuple[str, str], ...]] = set()


def configure_tensorstore(deadlines: Deadlines) -> None:
    """Gives tensorstore's HTTP transport the same stall bound, unless one is set already.

    tensorstore reads its stall bound from the environment once per process
    (there is no spec or context option for it), so this bound is
    process-wide by tensorstore's design: the first backend to open
    tensorstore sets it, unless the user did (:func:`tensorstore_environment`
    gives the variables, for a launcher). A backend whose deadlines differ from
    the bound in force gets a warning instead of a silent difference: its
    tensorstore requests keep the bound in force; its own requests use its
    deadlines.
    """
    wanted = tensorstore_environment(deadlines)
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    differs = tuple(sorted((k, os.environ[k]) for k, v in wanted.items() if os.environ[k] != v))
    if differs and differs not in _warned:
        _warned.add(differs)
        logger.warning(
            "tensorstore's stall bound is process-wide and already %s; array requests keep "
            "it, not these deadlines (%s)",
            ", ".join(f"{k}={v}" for k, v in differs),
            ", ".join(f"{k}={v}" for k, v in wanted.items()),
        )


def tensorstore_stall_bound() -> str:
    """tensorstore's stall bound as configured in this process, for error messages."""
    return (
        f"{os.environ.get(_TS_LIMIT, '?')} bytes/s over {os.environ.get(_TS_TIME, '?')}s "
        f"({_TS_LIMIT}, {_TS_TIME})"
    )


def process_index() -> int:
    """This process's index in a ``jax.distributed`` job (0 when JAX is not in use)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 0
    try:
        return int(jax.process_index())
    except Exception:  # JAX imported but its backends not initialised
        return 0


async def within(deadline_s: float, what: Callable[[], str], fn: Callable[[], Awaitable[T]]) -> T:
    """``fn()``, or :class:`RequestStalled` naming ``what()`` once ``deadline_s`` has passed."""
    scope = asyncio.timeout(deadline_s)
    try:
        async with scope:
            return await fn()
    except TimeoutError as exc:
        if scope.expired():
            raise RequestStalled(f"{what()}: no answer within {deadline_s:.1f}s") from exc
        raise


class RequestStalled(TimeoutError):
    """One attempt of a request outlived its deadline (retried as transient)."""


async def hedged(
    start: Callable[[], Awaitable[T]],
    after_s: float,
    cancel: Callable[[Awaitable[T]], None] = lambda aw: None,
    again: Callable[[], Awaitable[T]] | None = None,
) -> T:
    """The first successful answer of ``start()``, asked again if none came in ``after_s``.

    The second request is ``again()`` (default ``start()``); both must be
    idempotent reads of the same bytes. ``cancel`` stops a losing request's
    awaitable (a tensorstore future). When both fail, the first one's error is
    raised.
    """
    first_aw = start()
    first = asyncio.ensure_future(first_aw)
    done, _ = await asyncio.wait({first}, timeout=after_s)
    if done:
        return first.result()
    second_aw = (again or start)()
    second = asyncio.ensure_future(second_aw)
    pending = {first, second}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is None:
                    return task.result()
        return first.result()  # both failed: the first request's error
    finally:
        for task, aw in ((first, first_aw), (second, second_aw)):
            if not task.done():
                cancel(aw)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
