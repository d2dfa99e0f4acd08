"""Small helpers shared by the tests."""

from __future__ import annotations

import concurrent.futures
import os
import traceback
from collections.abc import Callable, Mapping
from typing import TypeVar

BUCKET = "cloudckpt-test"

T = TypeVar("T")


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{os.urandom(6).hex()}"


def run_at_once(cases: Mapping[str, Callable[[], T]]) -> dict[str, T]:
    """Runs every case in a thread of its own and waits for all; returns their results.

    For cases that mostly wait (a stall cut, a worker reaching its phase), each
    on its own run, proxy and workers. Raises AssertionError naming every case
    that failed, with the end of its traceback.
    """
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(case) for name, case in cases.items()}
    failures = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
    if failures:
        report = "\n".join(
            f"{name}: {''.join(traceback.format_exception(error))[-2500:]}"
            for name, error in failures.items()
        )
        raise AssertionError(f"{len(failures)} of {len(cases)} cases failed:\n{report}")
    return {name: f.result() for name, f in futures.items()}
