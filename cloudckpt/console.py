"""What the command line writes: results, progress, errors and debug logs.

Results go to stdout, progress and errors to stderr, every line through the
secret redaction of :mod:`cloudckpt.storage.redact`. Progress is a tqdm bar on
a terminal and a line every few seconds elsewhere (pipes, files, CI logs).
The commands themselves are in :mod:`cloudckpt.cli`, their logic in
:mod:`cloudckpt.tools`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from cloudckpt.storage import redact as _redact
from cloudckpt.tools import inspect as _inspect

#: Seconds between plain progress lines when stderr is not a terminal.
PLAIN_PROGRESS_INTERVAL_S = 5.0


class Console:
    """Where the command writes: results on stdout, progress and errors on stderr."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, quiet: bool = False) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.quiet = quiet
        self._secrets = _redact.secret_values()

    def redact(self, text: str) -> str:
        return _redact.redact(text, self._secrets)

    def out(self, text: str = "") -> None:
        self.stdout.write(self.redact(text) + "\n")
        self.stdout.flush()

    def err(self, text: str) -> None:
        self.stderr.write(self.redact(text) + "\n")
        self.stderr.flush()

    def json(self, value: Any) -> None:
        self.out(json.dumps(value, indent=2, sort_keys=True, default=str))

    def progress(self, label: str, total: int) -> _inspect.Progress:
        if self.quiet or total <= 0:
            return _inspect.NoProgress()
        if _isatty(self.stderr):
            return _BarProgress(label, total, self.stderr)
        return _PlainProgress(label, total, self)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _BarProgress:
    """A tqdm bar in bytes with rate and ETA (terminals)."""

    def __init__(self, label: str, total: int, stream: TextIO) -> None:
        from tqdm import tqdm

        try:
            size = os.get_terminal_size(stream.fileno())
        except (AttributeError, OSError, ValueError):
            size = os.terminal_size((0, 0))
        # tqdm draws nothing on a terminal that reports no size (a fresh pty).
        width: dict[str, Any] = (
            {"dynamic_ncols": True} if min(size) > 0 else {"ncols": 100, "nrows": 24}
        )
        self._bar = tqdm(
            total=total,
            desc=label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=stream,
            leave=True,
            mininterval=0.2,
            **width,
        )
        self._lock = threading.Lock()

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


class _PlainProgress:
    """Log lines every few seconds and one at the end (pipes, files, CI logs)."""

    def __init__(self, label: str, total: int, console: Console) -> None:
        self._label = label
        self._total = total
        self._console = console
        self._done = 0
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._closed = False

    def _line(self, final: bool) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = self._done / elapsed
        if final:
            return (
                f"{self._label}: {human_bytes(self._done)} in {elapsed:.1f}s "
                f"({human_bytes(rate)}/s)"
            )
        left = (self._total - self._done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else str(dt.timedelta(seconds=round(left)))
        return (
            f"{self._label}: {human_bytes(self._done)} / {human_bytes(self._total)} "
            f"({100 * self._done / self._total:.0f}%), {human_bytes(rate)}/s, ETA {eta}"
        )

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            now = time.monotonic()
            if now - self._last >= PLAIN_PROGRESS_INTERVAL_S and self._done < self._total:
                self._last = now
                self._console.err(self._line(final=False))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._console.err(self._line(final=True))


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def utc(ts: float | None) -> str:
    """A POSIX time as ``YYYY-MM-DD HH:MM:SS`` in UTC; ``-`` for None."""
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def table_lines(rows: list[list[str]]) -> list[str]:
    """``rows`` (all of one length) as lines of left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def metrics_text(metrics: dict[str, Any]) -> str:
    """``k=v`` pairs, floats to 6 significant digits; ``-`` for none."""
    if not metrics:
        return "-"
    return " ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def claim_text(claim: dict[str, Any] | None) -> str:
    """One line on an uncommitted step's claim: live or abandoned, by whom, how old."""
    if claim is None:
        return "no readable claim"
    state = "live" if claim["live"] else "abandoned"
    return (
        f"{state}: attempt {claim['attempt'][:12]} by pid {claim['pid']} on {claim['host']}, "
        f"{claim['age_s']:.0f}s old"
    )


def error_text(exc: BaseException) -> str:
    """An error as one line (a ``KeyError`` says it is a missing key)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return text


def debug_logging(stderr: TextIO) -> Callable[[], None]:
    """DEBUG logs on ``stderr``, every root handler redacting; returns how to undo it.

    botocore's DEBUG log carries request headers (``Authorization``,
    ``X-Amz-Security-Token``) and signed URLs, so the redacting filter goes on
    the handler installed here and on any the application already had.
    """
    root = logging.getLogger()
    added: logging.Handler | None = None
    if not root.handlers:
        added = logging.StreamHandler(stderr)
        added.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(added)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    redacting = _redact.RedactingFilter()
    handlers = list(root.handlers)
    for handler in handlers:
        handler.addFilter(redacting)

    def undo() -> None:
        for handler in handlers:
            handler.removeFilter(redacting)
        if added is not None:
            root.removeHandler(added)
        root.setLevel(previous_level)

    return undo
