"""What every scenario shares: the run configuration, the context, timing and statistics.

A scenario is a function ``(Context) -> dict`` registered with
:func:`scenario`; ``run.py`` calls the selected ones in order and stores each
result under its name in ``latest.json``. Adding a scenario (for example a
two-process run joined by ``jax.distributed``) means writing one module with
one registered function and importing it in ``run.py``.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from benchmarks.targets import Target

MiB = 1 << 20


@dataclass
class Config:
    """Everything a run is parameterised by (see ``run.py --help``)."""

    size_mib: float = 512.0
    reps: int = 3
    backends: list[str] = field(default_factory=lambda: ["file", "s3", "gcs"])
    peer: bool = True
    engine_all: bool = False
    scale_sizes_mib: list[float] = field(default_factory=lambda: [64, 256, 1024, 2048])
    scale_reps: int = 1
    small_reps: int = 3
    leaf_counts: list[int] = field(default_factory=lambda: [10, 100, 1000, 10000])
    leaves_total_mib: float = 16.0
    goal_leaves: int = 10000
    goal_leaf_bytes: int = 4096
    orbax_many_leaves: bool = False
    memory_reps: int = 1
    mp_size_mib: float = 192.0
    mp_reps: int = 3
    io_bytes_size_mib: float = 32.0
    straggler_size_mib: float = 64.0
    straggler_floors_s: list[float] = field(default_factory=lambda: [2.0, 20.0])
    listing_steps: int = 5
    #: The restore_phases scenario: its own tree size (the issue measures 1 GiB and 4 GiB),
    #: repetitions (median of 5), and the page-cache state of file reads (warm or cold).
    phases_size_mib: float = 1024.0
    phases_reps: int = 5
    file_cache: str = "warm"
    listing_objects: int = 10000
    #: The capped_streams scenario: an array saved as two objects, restored through a relay
    #: holding each connection's downloads to ``capped_rate_mbs`` MB/s.
    capped_size_mib: float = 256.0
    capped_rate_mbs: float = 25.0
    #: The restore_latency scenario: how long the proxy holds every answer back.
    latency_ms: float = 25.0
    capped_reps: int = 3
    scenarios: list[str] = field(default_factory=list)
    workdir: str = ""
    quick: bool = False


@dataclass
class Context:
    """The state scenarios share: config, servers, targets, the mesh and the main tree."""

    config: Config
    targets: list[Target]
    servers: Any | None
    mesh: Any
    started: float = field(default_factory=time.monotonic)
    _main_tree: Any = None

    def main_tree(self) -> Any:
        """The model-like tree of ``config.size_mib`` MiB, built once."""
        if self._main_tree is None:
            from benchmarks import tree

            with stopwatch() as elapsed:
                self._main_tree = tree.model_tree(self.config.size_mib, self.mesh)
            self.log(f"built the {self.config.size_mib:g} MiB tree in {elapsed():.1f}s")
        return self._main_tree

    def drop_main_tree(self) -> None:
        self._main_tree = None
        gc.collect()

    def target(self, name: str) -> Target | None:
        return next((t for t in self.targets if t.name == name), None)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)


Scenario = Callable[[Context], dict[str, Any]]
_REGISTRY: dict[str, tuple[int, Scenario]] = {}


def scenario(name: str, order: int) -> Callable[[Scenario], Scenario]:
    """Registers a scenario under ``name``; scenarios run by ascending ``order``."""

    def register(fn: Scenario) -> Scenario:
        if name in _REGISTRY:
            raise ValueError(f"scenario {name!r} is registered twice")
        _REGISTRY[name] = (order, fn)
        return fn

    return register


def scenarios() -> dict[str, Scenario]:
    """Every registered scenario, in running order."""
    return {name: fn for name, (_, fn) in sorted(_REGISTRY.items(), key=lambda kv: kv[1][0])}


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...``; ``elapsed()`` is frozen at exit."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def samples(values: Sequence[float]) -> dict[str, Any]:
    """Median plus every sample (seconds)."""
    return {"median_s": median(values), "samples_s": [round(v, 4) for v in values]}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope * x`` with r² and the worst relative residual."""
    n = len(xs)
    if n < 2:
        return {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "max_rel_dev": math.nan}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else math.nan
    intercept = my - slope * mx
    fitted = [intercept + slope * x for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {
        "slope": slope,
        "intercept": intercept,
        "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
        "max_rel_dev": max(abs(y - f) / y for y, f in zip(ys, fitted, strict=True) if y),
    }


def aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """``header`` and ``rows`` as text lines, each column left-aligned to its widest cell."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
