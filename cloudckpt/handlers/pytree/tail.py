"""Stragglers on tensorstore's channel: hedged region reads and errors that name the object.

tensorstore bounds each of its requests with the curl stall limit that
:func:`cloudckpt.storage.deadline.configure_tensorstore` sets, and retries a
cut request itself. What it cannot do is hedge a slow read, or say which
object and process gave up: its error reads ``All N retry attempts failed:
CURL error Timeout was reached``. Both are done here, around its calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import tensorstore as ts

from cloudckpt.storage.deadline import (
    Deadlines,
    hedged,
    process_index,
    tensorstore_stall_bound,
)
from cloudckpt.storage.redact import redact

#: What tensorstore's error text says when its retries of stalled requests ran out.
_STALL_WORDS = ("Timeout was reached", "Operation too slow", "DEADLINE_EXCEEDED", "timed out")


def hedge_context(context: ts.Context) -> ts.Context:
    """A child of ``context`` with a cache of its own.

    A read through the same cache joins the in-flight request for the same
    chunk instead of making a new one, so a hedge needs another cache; the
    other resources (request concurrency, retries, credentials) are shared.
    """
    return ts.Context(ts.Context.Spec({"cache_pool": {}}), context)


def _cancel(aw: Any) -> None:
    cancel = getattr(aw, "cancel", None)
    if cancel is not None:
        cancel()


async def read(
    start: Callable[[], Awaitable[Any]],
    again: Callable[[], Awaitable[Any]],
    nbytes: int,
    deadlines: Deadlines | None,
) -> Any:
    """``start()``, hedged by ``again()`` when it is slow (per ``deadlines``)."""
    if deadlines is None or not deadlines.hedge:
        return await start()
    return await hedged(start, deadlines.hedge_after_s(nbytes), _cancel, again)


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
