"""The one retry policy every backend shares.

Transient failures (HTTP 408, 429, 5xx, dropped or reset connections,
timeouts) are retried with exponential backoff and full jitter, bounded both in
attempts and in total time. That is what both clouds document: S3 asks for
exponential backoff on ``503 SlowDown`` and 5xx, and for a plain retry of a
conditional write answered ``409 ConditionalRequestConflict``; GCS asks for
truncated exponential backoff with jitter on 408, 429 and 5xx. A server that
names a wait in ``Retry-After`` gets at least that wait (never past the
total-time budget). The client libraries' own retry loops are switched
off in the backends so that attempts are not multiplied and every retry is
counted here. Anything else is raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
import tenacity

from cloudckpt.storage.redact import redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth another attempt.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Error codes worth another attempt whatever their status. S3 answers a
#: conditional write that raced another with 409 ConditionalRequestConflict and
#: documents "retry the request"; other 409s (BucketNotEmpty, ...) are final.
TRANSIENT_CODES = frozenset({"ConditionalRequestConflict", "SlowDown", "RequestTimeout"})


def chain(exc: BaseException, *, context: bool = True) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, outermost first (each once).

    ``context``: also follow an exception raised while handling another
    (``__context__``) where none was given as the cause; without it, only
    explicit causes (``raise ... from``).
    """
    out: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(current)
        current = current.__cause__ or (current.__context__ if context else None)
    return out


def error_code_of(exc: BaseException) -> str | None:
    """The service's error code (S3 ``Error.Code``, GCS ``errors[0].reason``), if any."""
    for current in chain(exc):
        response = getattr(current, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            code = (response.get("Error") or {}).get("Code")
            if code:
                return str(code)
        code = getattr(current, "error_code", None)  # set by the GCS backend
        if isinstance(code, str) and code:
            return code
    return None


def retry_after_of(exc: BaseException) -> float | None:
    """Seconds the server asked to wait (a ``Retry-After`` header in seconds), if any."""
    for current in chain(exc):
        value = getattr(current, "retry_after", None)  # set by the GCS backend
        response = getattr(current, "response", None)
        if value is None and isinstance(response, dict):  # botocore ClientError
            headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
            value = headers.get("retry-after")
        if value is None:
            continue
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            return None  # an HTTP date: rare, and backoff covers it
        return seconds if seconds >= 0 else None
    return None


def http_status_of(exc: BaseException) -> int | None:
    """The HTTP status behind an exception from aiohttp, botocore or gcsfs, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        for attr in ("status", "code"):  # aiohttp ClientResponseError, gcsfs HttpError
            value = getattr(current, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
        current = current.__cause__ or current.__context__
    return None


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [
        asyncio.TimeoutError,
        TimeoutError,
        ConnectionError,
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
    ]
    try:  # botocore is present with s3fs; keep the S3 extra optional
        from botocore import exceptions as boto

        types += [boto.HTTPClientError, boto.ConnectionError]
    except ImportError:
        pass
    try:  # gcsfs raises requests' ProxyError for HTTP 502
        import requests

        types.append(requests.exceptions.ConnectionError)
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT_TYPES = _transient_types()


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt of the same request may succeed."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
        return False
    if any(isinstance(current, _TRANSIENT_TYPES) for current in chain(exc, context=False)):
        return True
    return http_status_of(exc) in TRANSIENT_STATUSES or error_code_of(exc) in TRANSIENT_CODES


@dataclass
class RetryStats:
    """Counters of what the policy did, for tests, benchmarks and logs."""

    calls: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    gave_up: Counter[str] = field(default_factory=Counter)

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def total_retries(self) -> int:
        return sum(self.retries.values())

    def reset(self) -> None:
        self.calls.clear()
        self.retries.clear()
        self.gave_up.clear()


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in attempts and total time.

    Attributes:
        max_attempts: Attempts per request, the first included.
        initial_backoff_s: Backoff before the second attempt (before jitter).
        max_backoff_s: Cap on one backoff.
        max_total_s: Give up once this much time has passed since the first attempt.
    """

    max_attempts: int = 10
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    max_total_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                "RetryPolicy needs 0 <= initial_backoff_s <= max_backoff_s, got "
                f"{self.initial_backoff_s} and {self.max_backoff_s}"
            )

    def _wait(self, start: float) -> Callable[[tenacity.RetryCallState], float]:
        """Jittered exponential backoff, stretched to any ``Retry-After`` the server sent."""
        backoff = tenacity.wait_random_exponential(
            multiplier=self.initial_backoff_s, max=self.max_backoff_s
        )

        def wait(state: tenacity.RetryCallState) -> float:
            delay = backoff(state)
            exc = state.outcome.exception() if state.outcome else None
            asked = retry_after_of(exc) if exc is not None else None
            if asked is not None:
                left = self.max_total_s - (time.monotonic() - start)
                delay = max(delay, min(asked, max(left, 0.0)))
            return delay

        return wait

    async def call(
        self,
        op: str,
        fn: Callable[[], Awaitable[T]],
        stats: RetryStats,
        describe: Callable[[], str] = lambda: "",
    ) -> T:
        """Runs ``fn`` until it succeeds, fails permanently, or the budget is spent.

        A transient failure that exhausts the budget is re-raised as
        ``TimeoutError`` (out of time) or ``ConnectionError`` (out of attempts),
        naming the operation and chaining the last error.
        """
        start = time.monotonic()
        if self.max_attempts == 1:  # no retries: skip tenacity's per-call machinery
            stats.calls[op] += 1
            try:
                return await fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                stats.gave_up[op] += 1
                raise ConnectionError(
                    f"{f'{op} {describe()}'.strip()} failed (retries disabled): "
                    f"{type(exc).__name__}: {_safe_text(exc)}"
                ) from exc

        def before_sleep(state: tenacity.RetryCallState) -> None:
            stats.retries[op] += 1
            exc = state.outcome.exception() if state.outcome else None
            logger.debug(
                "retrying %s %s after %s (attempt %d)",
                op,
                describe(),
                type(exc).__name__,
                state.attempt_number,
            )

        async def counted() -> T:
            stats.calls[op] += 1
            return await fn()

        retrying = tenacity.AsyncRetrying(
            stop=(
                tenacity.stop_after_attempt(self.max_attempts)
                | tenacity.stop_after_delay(self.max_total_s)
            ),
            wait=self._wait(start),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return await retrying(counted)
        except Exception as exc:
            if not is_transient(exc):
                raise
            stats.gave_up[op] += 1
            elapsed = time.monotonic() - start
            what = f"{op} {describe()}".strip()
            if elapsed >= self.max_total_s:
                raise TimeoutError(
                    f"{what} kept failing for {elapsed:.1f}s (retry budget "
                    f"{self.max_total_s:.0f}s): {type(exc).__name__}; check the endpoint "
                    "and network, or raise RetryPolicy.max_total_s"
                ) from exc
            raise ConnectionError(
                f"{what} failed {self.max_attempts} times in {elapsed:.1f}s: "
                f"{type(exc).__name__}: {_safe_text(exc)}; check the endpoint and "
                "network, or raise RetryPolicy.max_attempts"
            ) from exc


def _safe_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    # Signed URLs and echoed headers carry credentials; never repeat one.
    return redact(text)[:200]


#: The policy backends use unless given another.
DEFAULT_POLICY = RetryPolicy()
