"""Bounding a single slow request: per-request deadlines and hedged requests.

A pod-scale save is as slow as its slowest request. A request that stalls
(a wedged connection, a dead storage node) never fails on its own, so without
a deadline it holds the whole step; with one it becomes a transient failure
that the retry policy (:mod:`cloudckpt.storage.retry`) repeats on a fresh
connection. A read that is merely slow is *hedged*: a second, identical
request starts after a delay and the first answer wins.

Both are sized from the bytes requested, so large transfers are not cut short:

* deadline of one attempt = ``floor_s + nbytes / min_rate_bps``;
* hedge delay = ``hedge_floor_s + nbytes / hedge_rate_bps``.

Those static bounds must hold on the slowest link a user may have, so they are
long (20 s) and a stall that costs one of them costs a short save several
times over. Once the store has answered a few requests of a kind, the bounds
come from what it actually did (:class:`Latencies`, the recent answer times
of that kind of request on that backend): a request is hedged once it has
taken ``hedge_factor`` times the typical time (for its size) of the requests
answered while it ran, and an attempt is cut at ``cut_factor`` times the
typical time. The callers keep their requests out of hidden queues
(tensorstore's admission queue, see ``cloudckpt.handlers.pytree.tail``), so
that a request's time is the store's, not its wait. The static bounds stay as
caps, and are the only bounds of the first requests of a process. A hedge that is waiting
re-reads the typical time as answers arrive, so a request stalled among the
very first is hedged as soon as its peers show how long it should have taken.

Two HTTP clients carry cloudckpt's bytes and each gets the bound its own way:

* the backends (s3fs/gcsfs: metadata, markers, small objects): every attempt
  runs under its (adaptive) deadline here, and ``get`` is hedged; a cut
  create-only write is retried on its conditional path (the create token
  tells a retry whether the cut attempt had landed);
* tensorstore (array chunks and packs) has no per-request timeout option; its
  curl transport aborts a transfer slower than
  ``TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES`` per second over
  ``TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS``, which is the same bound (a
  stalled request is cut after ``floor_s``, one moving at ``min_rate_bps`` is
  never cut), and retries the aborted request under its
  ``*_request_retries`` context resource. tensorstore reads these variables
  once per process, at its first HTTP request, so :func:`configure_tensorstore`
  sets them (unless the user has) before cloudckpt opens anything. That
  bound cannot adapt, so the pytree handler hedges tensorstore's requests
  itself with :func:`hedged`: reads of array regions and packs, and writes of
  chunks and packs, which are safe to send twice because data objects live
  under per-attempt names (the same bytes to the same key; format 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cloudckpt.storage.retry import chain

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
        hedge: Whether requests are hedged at all.
        hedge_factor: Once answer times are known, a request is hedged after
            this many times the typical time of its cohort (the requests of its
            kind answered while it ran), scaled to its size.
        hedge_min_s: The shortest adaptive hedge delay.
        cut_factor: Once answer times are known, an attempt is cut after this
            many times the typical time (and retried).
        cut_min_s: The shortest adaptive deadline of an attempt.
        cut_growth: Each attempt of a request after one that was cut gets this
            many times the previous adaptive deadline (still capped by the
            static bound): a request that is slow every time, not stalled (a
            listing of a large prefix among small writes), is answered on a
            later attempt instead of being cut on all of them.
        min_samples: Answers of a kind needed before its bounds adapt.
        hedge_share: At most this share of a kind's requests in flight are
            hedges at once (at least one). Hedges answer stragglers; when many
            requests are slow together the channel or the client is, and a
            second copy of each would double the load on it. A request past
            its hedge delay waits for a free share (its deadline still stands).
    """

    floor_s: float = 20.0
    min_rate_bps: float = 256 * 1024
    hedge_floor_s: float = 5.0
    hedge_rate_bps: float = 32 * 1024 * 1024
    hedge: bool = True
    hedge_factor: float = 2.5
    hedge_min_s: float = 0.5
    cut_factor: float = 10.0
    cut_min_s: float = 1.0
    cut_growth: float = 4.0
    min_samples: int = 5
    hedge_share: float = 0.05

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
        if min(self.hedge_factor, self.cut_factor) < 1 or self.min_samples < 1:
            raise ValueError(
                "Deadlines needs hedge_factor >= 1, cut_factor >= 1 and min_samples >= 1, got "
                f"{self.hedge_factor}, {self.cut_factor} and {self.min_samples}"
            )
        if not 0 < self.hedge_share <= 1:
            raise ValueError(f"Deadlines needs 0 < hedge_share <= 1, got {self.hedge_share}")
        if self.cut_growth < 1:
            raise ValueError(f"Deadlines needs cut_growth >= 1, got {self.cut_growth}")
        if self.hedge_min_s < 0 or self.cut_min_s <= 0:
            raise ValueError(
                f"Deadlines needs hedge_min_s >= 0 and cut_min_s > 0, got {self.hedge_min_s} "
                f"and {self.cut_min_s}"
            )

    def request_s(self, nbytes: int) -> float:
        """The deadline of one attempt moving ``nbytes``."""
        return self.floor_s + max(nbytes, 0) / self.min_rate_bps

    def hedge_after_s(self, nbytes: int) -> float:
        """How long a request of ``nbytes`` runs alone before it is hedged (static bound)."""
        return self.hedge_floor_s + max(nbytes, 0) / self.hedge_rate_bps

    def attempt_s(self, nbytes: int, seen: Latencies | None, cuts: int = 0) -> float:
        """The deadline of one attempt: ``cut_factor`` x the typical time, capped by the floor.

        ``cuts``: how many earlier attempts of the same request were cut; each
        multiplies the adaptive deadline by ``cut_growth``.
        """
        static = self.request_s(nbytes)
        typical = seen.typical_s(nbytes, self.min_samples) if seen is not None else None
        if typical is None:
            return static
        adaptive = max(self.cut_min_s, self.cut_factor * typical)
        return min(static, adaptive * self.cut_growth ** min(max(cuts, 0), 64))

    def hedge_delay_s(self, nbytes: int, seen: Latencies | None, since: float) -> float:
        """How long a request that started at ``since`` runs alone before it is hedged.

        ``hedge_factor`` x the typical time of its cohort: the requests of its
        kind answered since it started (they shared its conditions), once
        ``min_samples`` of them have; until then the typical time of the
        latest answers of its kind (a request late in a save, or in a save of
        few objects, has few peers left to judge it by). Never past the
        attempt's deadline. With no answers of its kind yet (the first
        requests of a process), ``hedge_after_s``, or the attempt's deadline
        while more than ``min_samples`` requests of its kind are in flight:
        they will answer soon enough to judge by, and a wave of large writes
        would all outlive the static guess.
        """
        if seen is None:
            return self.hedge_after_s(nbytes)
        typical = seen.typical_s(nbytes, self.min_samples, since=since)
        if typical is None:
            typical = seen.typical_s(nbytes, self.min_samples)
        if typical is None:
            crowded = seen.in_flight > self.min_samples
            return self.request_s(nbytes) if crowded else self.hedge_after_s(nbytes)
        return min(self.request_s(nbytes), max(self.hedge_min_s, self.hedge_factor * typical))


class Latencies:
    """The recent answer times of one kind of request (one backend operation, one channel).

    Thread-safe: tensorstore's and the backends' requests finish on whatever
    loop or thread runs them. Only successful requests are observed, so a
    stall never raises the yardstick it is measured against.
    """

    def __init__(self, kind: str = "", window: int = 256) -> None:
        #: What requests these are (``"put"``, ``"array write"``), for logs.
        self.kind = kind
        #: (start on the monotonic clock, bytes, seconds) of the latest answers.
        self._samples: deque[tuple[float, int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()
        #: Requests of this kind started and not yet answered (or failed).
        self.in_flight = 0
        #: Hedges of this kind sent and not yet settled (``try_hedge``).
        self.hedging = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def ended(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def try_hedge(self, share: float) -> bool:
        """Takes a hedge slot if fewer than ``share`` of the requests in flight (min 1) hold one.

        The caller gives it back with ``hedge_done`` once its hedge is settled.
        """
        with self._lock:
            if self.hedging >= max(1, int(share * self.in_flight)):
                return False
            self.hedging += 1
            return True

    def hedge_done(self) -> None:
        with self._lock:
            self.hedging -= 1

    def observe(self, nbytes: int, seconds: float, start: float | None = None) -> None:
        """Records one answered request of ``nbytes`` that took ``seconds`` from ``start``."""
        if start is None:
            start = time.monotonic() - seconds
        with self._lock:
            self._samples.append((start, max(nbytes, 0), max(seconds, 0.0)))

    def typical_s(self, nbytes: int, min_samples: int, since: float | None = None) -> float | None:
        """The time a request of ``nbytes`` typically takes; None below ``min_samples`` answers.

        The median answer time, scaled up in proportion when ``nbytes`` is
        larger than the median size seen (never down: small requests cost
        their round trip, whatever their size). With ``since``, only requests
        answered then or later count.
        """
        with self._lock:
            samples = list(self._samples)
        if since is not None:
            samples = [x for x in samples if x[0] + x[2] >= since]
        if len(samples) < min_samples:
            return None
        median_s = statistics.median(x[2] for x in samples)
        median_bytes = statistics.median(x[1] for x in samples)
        return median_s * max(1.0, nbytes / median_bytes) if median_bytes > 0 else median_s


async def timed(
    seen: Latencies | None,
    nbytes: int,
    fn: Callable[[], Awaitable[T]],
    held: Callable[[], float] | None = None,
) -> T:
    """``await fn()``, its answer time recorded in ``seen`` when it succeeds.

    ``held``: seconds (a running total) the request spent waiting for its
    consumer rather than the store (a sink's backlog); they are left out of
    the time recorded.
    """
    if seen is None:
        return await fn()
    start = time.monotonic()
    before = held() if held is not None else 0.0
    seen.started()
    try:
        result = await fn()
    finally:
        seen.ended()
    waited = held() - before if held is not None else 0.0
    seen.observe(nbytes, time.monotonic() - start - waited, start)
    return result


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


async def within(
    deadline_s: float,
    what: Callable[[], str],
    fn: Callable[[], Awaitable[T]],
    held: Callable[[], float] | None = None,
) -> T:
    """``fn()``, or :class:`RequestStalled` naming ``what()`` once ``deadline_s`` has passed.

    ``held`` (a running total of seconds the request waited for its consumer,
    not the store) pushes the deadline back by as much: a read paused because
    the restore cannot place its bytes yet has not stalled.
    """
    scope = asyncio.timeout(deadline_s)
    loop = asyncio.get_running_loop()
    end, before = loop.time() + deadline_s, held() if held is not None else 0.0
    pending: asyncio.TimerHandle | None = None

    def push_back() -> None:
        # Just before the deadline: move it by the time held so far, and look again
        # just before the new one. Unheld, the deadline stands and expires.
        nonlocal pending
        assert held is not None
        when = end + (held() - before)
        if when > (scope.when() or 0) and not scope.expired():
            scope.reschedule(when)
            pending = loop.call_at(when - _LOOK_BEFORE_S, push_back)

    if held is not None:
        pending = loop.call_at(end - _LOOK_BEFORE_S, push_back)
    try:
        async with scope:
            return await fn()
    except TimeoutError as exc:
        if scope.expired():
            waited = held() - before if held is not None else 0.0
            raise RequestStalled(
                f"{what()}: no answer within {deadline_s:.1f}s"
                + (f" (plus {waited:.1f}s its reader waited to place bytes)" if waited else "")
            ) from exc
        raise
    finally:
        if pending is not None:
            pending.cancel()


#: How long before a deadline ``within`` moves it back by the time its request was held.
_LOOK_BEFORE_S = 0.05


class RequestStalled(TimeoutError):
    """One attempt of a request outlived its deadline (retried as transient)."""


#: Attempts of the request being retried that were cut so far (set per attempt by the
#: backends' retry loop, read where each request's deadline is sized).
earlier_cuts: contextvars.ContextVar[int] = contextvars.ContextVar("earlier_cuts", default=0)


def was_cut(exc: BaseException) -> bool:
    """Whether the attempt behind ``exc`` (or an error it caused) ran out of its deadline."""
    return any(isinstance(current, RequestStalled) for current in chain(exc, context=False))


def counting_cuts(attempt: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """``attempt`` for a retry loop, each call run with :data:`earlier_cuts` set.

    The value is how many earlier calls were cut (:func:`was_cut`); the
    deadlines sized inside the call (and in the tasks it starts, which copy
    the context) grow with it (``Deadlines.cut_growth``).
    """
    cuts = 0

    async def run() -> T:
        nonlocal cuts
        token = earlier_cuts.set(cuts)
        try:
            return await attempt()
        except Exception as exc:
            if was_cut(exc):
                cuts += 1
            raise
        finally:
            earlier_cuts.reset(token)

    return run


async def hedged(
    start: Callable[[], Awaitable[T]],
    after_s: float | Callable[[], float],
    cancel: Callable[[Awaitable[T]], None] = lambda aw: None,
    again: Callable[[], Awaitable[T]] | None = None,
    what: str = "a request",
    slots: Latencies | None = None,
    share: float = 1.0,
) -> T:
    """The first successful answer of ``start()``, asked again if none came in ``after_s``.

    The second request is ``again()`` (default ``start()``); both must be
    idempotent: reads of the same bytes, or writes of the same bytes to the
    same key. ``after_s`` may be a function, re-read while the first request
    waits (an adaptive delay that shrinks as its peers answer). When both fail,
    the first one's error is raised. ``slots``: the requests of its kind,
    whose hedges in flight stay within ``share`` of them (``try_hedge``);
    past the delay with every share taken, it looks again shortly.

    No request outlives the call: once one answers, the other (the stalled
    loser) is stopped, with ``cancel`` on its awaitable (a tensorstore
    future) and by cancelling its task, and awaited; so are both when this
    call is itself cancelled (an attempt's deadline, ``within``), also while
    it waits to hedge. A cancelled aiohttp request closes its connection.
    """
    delay = after_s if callable(after_s) else (lambda: after_s)
    first_aw = start()
    first = asyncio.ensure_future(first_aw)
    running = [(first, first_aw)]
    slot = False
    try:
        began = time.monotonic()
        while True:
            wanted = delay()
            left = wanted - (time.monotonic() - began)
            if left <= 0:
                if slots is None or slots.try_hedge(share):
                    slot = slots is not None
                    break
                left = _BUDGET_LOOK_S  # every share is taken: look again shortly
            # An adaptive delay is re-read a few times per delay: often enough to follow it.
            wait = left if not callable(after_s) else min(left, max(0.05, wanted / 4))
            done, _ = await asyncio.wait({first}, timeout=wait)
            if done:
                return first.result()
        logger.debug("hedging %s after %.3fs", what, time.monotonic() - began)
        second_aw = (again or start)()
        second = asyncio.ensure_future(second_aw)
        running.append((second, second_aw))
        pending = {first, second}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is None:
                    return task.result()
        return first.result()  # both failed: the first request's error
    finally:
        # The loser, or both when this wait itself is cancelled (an attempt's deadline cut
        # it): a request nobody awaits would hold its connection until it ends, if ever.
        try:
            await _cancel_all(running, cancel)
        finally:
            if slot and slots is not None:
                slots.hedge_done()


#: How often a request past its hedge delay looks for a free hedge share.
_BUDGET_LOOK_S = 0.05


async def _cancel_all(
    running: list[tuple[asyncio.Future[T], Awaitable[T]]],
    cancel: Callable[[Awaitable[T]], None],
) -> None:
    """Cancels every request of ``running`` still in flight and waits until each has ended."""
    stopping = []
    for task, aw in running:
        if not task.done():
            cancel(aw)
            task.cancel()
            stopping.append(task)
    for task in stopping:
        with contextlib.suppress(BaseException):
            await task
