"""What a CheckpointManager saves and keeps: its options and the retention decision.

Nothing here does I/O or holds state: the manager asks which steps to delete
and deletes them (the primary process); the other processes apply the same
answer to their own step lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloudckpt.engine.multihost import MultiprocessingOptions


@dataclass(frozen=True)
class CheckpointManagerOptions:
    """How often to save, what to keep, and how.

    Attributes:
        save_interval_steps: ``save`` writes steps divisible by this (or forced,
            or at a preemption point).
        max_to_keep: Keep this many steps (the most recent; with ``best_fn``,
            the best). None keeps all.
        keep_period: Steps divisible by this are kept forever, on top of
            ``max_to_keep``.
        best_fn: Maps a step's metrics to a number to rank steps by.
        best_mode: ``"min"`` or ``"max"``: which end of ``best_fn`` is best.
        keep_checkpoints_without_metrics: With ``best_fn``, whether steps saved
            without metrics are kept (True) or are the first to go (False).
        enable_async: Commit in the background (training blocks only for the copy).
        async_timeout_s: A background save taking longer fails.
        cleanup_uncommitted_on_start: Remove what crashed saves left behind,
            in the background, when the manager starts.
        step_prefix: Name steps ``<step_prefix>_<step>`` instead of ``<step>``.
        step_format_fixed_length: Zero-pad step numbers to this many digits.
        save_on_preemption: Save any step at which JAX reports a preemption
            sync point, even if it is not due.
        multiprocessing_options: Primary process, active processes, barrier timeout.
        grace_s: How long an uncommitted save of another writer is protected
            from clean-up (defaults to the checkpointer's).
    """

    save_interval_steps: int = 1
    max_to_keep: int | None = None
    keep_period: int | None = None
    best_fn: Callable[[Mapping[str, Any]], float] | None = None
    best_mode: str = "max"
    keep_checkpoints_without_metrics: bool = True
    enable_async: bool = True
    async_timeout_s: float = 600.0
    cleanup_uncommitted_on_start: bool = True
    step_prefix: str | None = None
    step_format_fixed_length: int | None = None
    save_on_preemption: bool = True
    multiprocessing_options: MultiprocessingOptions | None = None
    grace_s: float | None = None

    def __post_init__(self) -> None:
        if self.save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {self.save_interval_steps}")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {self.max_to_keep}")
        if self.keep_period is not None and self.keep_period < 1:
            raise ValueError(f"keep_period must be >= 1 or None, got {self.keep_period}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.step_prefix is not None and not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9._-]*", self.step_prefix
        ):
            raise ValueError(
                f"step_prefix must be a plain name like 'ckpt', got {self.step_prefix!r}"
            )


def steps_to_delete(
    metrics: Mapping[int, Mapping[str, Any] | None],
    ranked: Sequence[int],
    options: CheckpointManagerOptions,
) -> list[int]:
    """The steps retention deletes, ascending.

    Args:
        metrics: The steps retention manages (committed, not being deleted,
            written by cloudckpt) and their metrics (None: saved without).
        ranked: Steps with metrics, best first by ``options.best_fn``; steps
            not in ``metrics`` are ignored.
        options: ``max_to_keep``, ``keep_period``, ``best_fn`` and
            ``keep_checkpoints_without_metrics`` decide.

    Contract: nothing is deleted while at most ``max_to_keep`` steps exist;
    steps divisible by ``keep_period`` are never deleted; without ``best_fn``
    the most recent ``max_to_keep`` are kept, with it the best
    ``max_to_keep`` (and, if so configured, every step without metrics).
    """
    if options.max_to_keep is None or len(metrics) <= options.max_to_keep:
        return []
    keep: set[int] = set()
    if options.keep_period:
        keep |= {s for s in metrics if s % options.keep_period == 0}
    if options.best_fn is not None:
        keep |= set([s for s in ranked if s in metrics][: options.max_to_keep])
        if options.keep_checkpoints_without_metrics:
            keep |= {s for s, m in metrics.items() if m is None}
    else:
        keep |= set(sorted(metrics)[-options.max_to_keep :])
    return sorted(s for s in metrics if s not in keep)
