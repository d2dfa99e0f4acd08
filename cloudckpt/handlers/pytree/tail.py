"""Stragglers on tensorstore's channel: hedged requests and errors that name the object.

tensorstore bounds each of its requests with the curl stall limit that
:func:`cloudckpt.storage.deadline.configure_tensorstore` sets, and retries a
cut request itself. That bound is static and process-wide (20 s at the
default floor), so a stalled request costs a short save all of it. What
tensorstore cannot do is hedge a slow request once its peers show it is
late, or say which object and process gave up: its error reads ``All N retry
attempts failed: CURL error Timeout was reached``. Both are done here, around
its calls: reads of regions and packs, and writes of chunks and packs (data
objects have per-attempt names, so a second write puts the same bytes under
the same key). The hedge delay adapts to the answer times of the same kind of
request on the same backend (:meth:`cloudckpt.storage.base.Backend.latencies`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import tensorstore as ts

from cloudckpt.storage.deadline import (
    Deadlines,
    Latencies,
    hedged,
    process_index,
    tensorstore_stall_bound,
    timed,
)
from cloudckpt.storage.redact import redact

#: Hedged requests a reader or writer keeps in flight through tensorstore: half
#: its admission limit (``*_request_concurrency`` 64 in the backends' contexts),
#: so that they do not queue inside it, where their answer times would measure
#: the queue.
REQUESTS_IN_FLIGHT = 32

#: The kinds of request whose answer times size the hedges
#: (:meth:`cloudckpt.storage.base.Backend.latencies`): all of tensorstore's
#: writes (chunks, packs, array metadata) are judged together, as are its reads.
WRITES = "tensorstore write"
READS = "tensorstore read"

#: What tensorstore's error text says when its retries of stalled requests ran out.
_STALL_WORDS = ("Timeout was reached", "Operation too slow", "DEADLINE_EXCEEDED", "timed out")


def hedge_context(context: ts.Context) -> ts.Context:
    """A child of ``context`` with a cache of its own.

    A read through the same cache joins the in-flight request for the same
    chunk instead of making a new one, so a hedge needs another cache; the
    other resources (request concurrency, retries, credentials) are shared.
    """
    return ts.Context(ts.Context.Spec({"cache_pool": {}}), context)


def request_slots(deadlines: Deadlines | None) -> contextlib.AbstractAsyncContextManager[Any]:
    """What a hedged request holds while it runs: one of :data:`REQUESTS_IN_FLIGHT` slots.

    No limit where nothing is hedged (local stores, ``Deadlines(hedge=False)``):
    there the admission queue measures nothing and a limit would only slow a save.
    """
    if deadlines is None or not deadlines.hedge:
        return contextlib.nullcontext()
    return asyncio.Semaphore(REQUESTS_IN_FLIGHT)


def _cancel(aw: Any) -> None:
    cancel = getattr(aw, "cancel", None)
    if cancel is not None:
        cancel()


def _cancelling(make: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """``make()`` awaited so that cancelling the wait cancels it at its source.

    A hedge's loser is cancelled as soon as the winner lands (``hedged``). A
    tensorstore future or write that ``make`` returns (a kvstore read or
    write: packs) is then cancelled with its own ``cancel()`` (awaiting a
    plain future passes the cancellation on too), so tensorstore drops the
    request instead of sending it again once its stall bound cuts the
    transfer. tensorstore 0.1.x cannot abort a transfer in flight (its curl
    transport has no cancellation), so the stalled connection stays open until
    that cut (``Deadlines.floor_s``). A zarr chunk write or array read awaited
    inside ``make`` runs on as tensorstore's cache writeback or read, which it
    sends once more after the cut: the same bytes to or from the same
    per-attempt key, one request (tests/test_hedge_cancel.py).
    """

    async def run() -> Any:
        aw = make()
        try:
            return await aw
        except asyncio.CancelledError:
            _cancel(aw)
            raise

    return run


async def hedge(
    start: Callable[[], Awaitable[Any]],
    again: Callable[[], Awaitable[Any]],
    nbytes: int,
    deadlines: Deadlines | None,
    seen: Latencies | None = None,
) -> Any:
    """``start()``, hedged by ``again()`` when it is slow (per ``deadlines`` and ``seen``).

    Both must be idempotent: reads of the same bytes, or writes of the same
    bytes to the same per-attempt key (never a create-only document). The
    answer time of whichever wins is recorded in ``seen``.
    """
    if deadlines is None or not deadlines.hedge:
        return await timed(seen, nbytes, start)
    since = time.monotonic()
    # The loser is cancelled as soon as the winner lands (``hedged``), down to its future.
    first, second = _cancelling(start), _cancelling(again)
    return await hedged(
        lambda: timed(seen, nbytes, first),
        lambda: deadlines.hedge_delay_s(nbytes, seen, since),
        again=lambda: timed(seen, nbytes, second),
        what=f"{seen.kind if seen is not None else 'request'} of {nbytes} bytes",
        slots=seen,
        share=deadlines.hedge_share,
    )


def stall_error(exc: BaseException, where: str, op: str) -> TimeoutError | None:
    """The error to raise for a tensorstore failure of ``op`` on ``where``, if it was stalls."""
    text = str(exc)
    if not any(word in text for word in _STALL_WORDS):
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    return TimeoutError(
        redact(
            f"{op} {where} on process {process_index()} stalled: tensorstore's requests made no "
            f"progress (stall bound {tensorstore_stall_bound()}) until its retries ran out: "
            f"{first[:300]}; check the store and the network, or raise Deadlines.floor_s and "
            "the retry policy"
        )
    )


def raise_if_stalled(exc: BaseException, where: str, op: str) -> None:
    """Raises :func:`stall_error` from ``exc`` when there is one; returns otherwise."""
    stalled = stall_error(exc, where, op)
    if stalled is not None:
        raise stalled from exc
