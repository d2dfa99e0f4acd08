"""CheckpointManager: numbered steps under a root, retention, best-k, preemption, clean-up.

Layout: step ``N`` lives at ``<root>/<name(N)>/`` where ``name(N)`` is ``N``
(optionally ``<step_prefix>_N``, optionally zero-padded). Children of the
root whose names do not parse as steps are ignored, never deleted.

Only committed steps are listed. The step list comes from one listing of the
root when the manager starts (and on ``reload``); afterwards it is kept up to
date from this manager's own saves and deletions. Only the primary process
lists or deletes; it shares what it found with the other processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import atomicity
from cloudckpt import orbax
from cloudckpt.engine.checkpointer import AsyncCheckpointer, Checkpointer, SaveTiming
from cloudckpt.engine.loop import check_not_forked, in_forked_child
from cloudckpt.engine.policy import CheckpointManagerOptions, steps_to_delete
from cloudckpt.format.step import StepMetadata, read_step_metadata
from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.handlers.base import CheckpointHandler
from cloudckpt.handlers.composite import CompositeCheckpointHandler
from cloudckpt.storage.path import StoragePath

logger = logging.getLogger(__name__)


@dataclass
class _Step:
    step: int
    metrics: dict[str, Any] | None = None
    nbytes: int = 0
    orbax: bool = False  # written by Orbax: listed and restored, never deleted by retention


@dataclass
class _State:
    """The manager's view of committed steps, shared with its background work."""

    steps: dict[int, _Step] = field(default_factory=dict)
    deleting: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class CheckpointManager:
    """Saves numbered steps of a training run under ``directory`` and manages them.

    Args:
        directory: Root URL (``gs://bucket/run``, ``s3://bucket/run``, a path).
        handler: Handler for each step (default: a CompositeCheckpointHandler).
        options: See :class:`CheckpointManagerOptions`.
        storage_options: Backend options overriding the environment.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        handler: CheckpointHandler | None = None,
        *,
        options: CheckpointManagerOptions | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._options = options or CheckpointManagerOptions()
        opts = self._options
        handler = handler if handler is not None else CompositeCheckpointHandler()
        common: dict[str, Any] = {
            "storage_options": storage_options,
            "multiprocessing_options": opts.multiprocessing_options,
        }
        if opts.enable_async:
            self._ckptr: Checkpointer = AsyncCheckpointer(
                handler, timeout_s=opts.async_timeout_s, grace_s=opts.grace_s, **common
            )
        else:
            if opts.grace_s is not None:
                common["grace_s"] = opts.grace_s
            self._ckptr = Checkpointer(handler, **common)
        self._group = self._ckptr.process_group
        self._state = _State()
        self._background: set[concurrent.futures.Future[Any]] = set()
        self._background_lock = threading.Lock()
        self._closed = False
        try:
            # Through the checkpointer's backends: one client per loop, closed with it.
            self._root = self._ckptr.location(directory)
            self.reload()
            if opts.cleanup_uncommitted_on_start and self._group.is_primary:
                self._in_background(self._cleanup_uncommitted())
        except BaseException:
            # A manager that failed to start must not keep its thread and clients.
            self._closed = True
            self._ckptr.close()
            raise

    # ------------------------------------------------------------------- naming
    @property
    def directory(self) -> StoragePath:
        return self._root

    def step_name(self, step: int) -> str:
        if step < 0:
            raise ValueError(f"steps are non-negative integers, got {step}")
        digits = str(step).zfill(self._options.step_format_fixed_length or 0)
        return f"{self._options.step_prefix}_{digits}" if self._options.step_prefix else digits

    def _parse_step(self, name: str) -> int | None:
        """The step ``name`` denotes, only if it is exactly what ``step_name`` writes.

        Anything else (``00000007`` without zero-padding, ``²``, a thousand
        digits) is not a step of this manager: ignored, never an error.
        """
        found = re.fullmatch(r"(?:(.*)_)?([0-9]{1,40})", name)
        if found is None or found.group(1) != self._options.step_prefix:
            return None
        step = int(found.group(2))
        return step if self.step_name(step) == name else None

    def step_path(self, step: int) -> StoragePath:
        return self._root / self.step_name(step)

    # ------------------------------------------------------------------ listing
    def reload(self) -> None:
        """Re-reads the committed steps (one listing, on the primary process)."""
        self._ckptr.check_open()
        found: list[dict[str, Any]] | None = None
        if self._group.is_primary:
            found = self._ckptr.run_on_loop(self._scan())
        found = self._group.share("manager-steps/" + self._root.url, found)
        with self._state.lock:
            self._state.steps = {
                int(s["step"]): _Step(
                    int(s["step"]),
                    s.get("metrics"),
                    int(s.get("nbytes", 0)),
                    bool(s.get("orbax", False)),
                )
                for s in found
            }

    async def _scan(self) -> list[dict[str, Any]]:
        """The committed steps under the root (plus metrics, with best_fn).

        One delimiter listing and a marker check per child (atomicity.scan): the
        cost grows with steps, not with their objects. Orbax hook: the tap keeps
        any object listing so Orbax discovery need not list again.
        """
        tap = orbax.ListingTap(self._root.backend)
        children = await atomicity.scan(tap, self._root.path, keep_foreign=True)
        steps = []
        for child in children:
            step = self._parse_step(child.name)
            if step is not None and child.committed:
                steps.append(_Step(step, None, child.nbytes or 0))
        # Orbax hook: committed steps Orbax wrote under the same root; only children
        # named like steps that are not cloudckpt's are listed to recognise them.
        ours = {s.step for s in steps}
        atomic_rename = self._root.backend.supports_atomic_rename
        theirs: dict[int, Any] = {}  # step -> what the listing says of the Orbax step
        foreign = [c.name for c in children if not c.ours and self._parse_step(c.name) is not None]
        for found in await orbax.steps_among(
            tap, self._root.path, foreign, atomic_rename=atomic_rename
        ):
            step = self._parse_step(found.name)
            if found.committed and step is not None and step not in ours:
                steps.append(_Step(step, None, found.nbytes, orbax=True))
                theirs[step] = found
        if self._options.best_fn is not None:
            # Ranking needs each step's metrics: one small read per kept step, at start only.
            await asyncio.gather(*(self._read_metrics(s, theirs.get(s.step)) for s in steps))
        return [
            {"step": s.step, "metrics": s.metrics, "nbytes": s.nbytes, "orbax": s.orbax}
            for s in steps
        ]

    async def _read_metrics(self, step: _Step, orbax_step: Any) -> None:
        """Sets ``step.metrics`` from its metadata; a step that cannot be read keeps None."""
        path = self.step_path(step.step)
        try:
            if step.orbax:  # described by the listing already: no second one
                meta = await orbax.step_metadata(path, orbax_step, with_items=False)
            else:
                meta = await read_step_metadata(path)
            step.metrics = meta.metrics or None
        except Exception:
            logger.warning("could not read metrics of step %d", step.step, exc_info=True)

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        with self._state.lock:
            return sorted(s for s in self._state.steps if s not in self._state.deleting)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def orbax_steps(self) -> list[int]:
        """Committed steps written by Orbax (listed and restorable; retention skips them)."""
        with self._state.lock:
            return sorted(
                s.step
                for s in self._state.steps.values()
                if s.orbax and s.step not in self._state.deleting
            )

    def best_step(self) -> int | None:
        """The step whose metrics ``best_fn`` ranks best (None without best_fn or metrics)."""
        ranked = self._ranked_by_metrics()
        return ranked[0] if ranked else None

    def _ranked_by_metrics(self) -> list[int]:
        best_fn = self._options.best_fn
        if best_fn is None:
            return []
        with self._state.lock:
            scored = [
                (float(best_fn(s.metrics)), s.step)
                for s in self._state.steps.values()
                if s.metrics is not None and s.step not in self._state.deleting
            ]
        reverse = self._options.best_mode == "max"
        return [step for _, step in sorted(scored, key=lambda t: (t[0], -t[1]), reverse=reverse)]

    # --------------------------------------------------------------------- save
    def should_save(self, step: int) -> bool:
        """Whether ``save(step)`` would write: due by interval, or at a preemption point."""
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        if self._options.save_on_preemption and _reached_preemption(step):
            return True
        return step % self._options.save_interval_steps == 0

    def save(
        self,
        step: int,
        args: CheckpointArgs | None = None,
        *,
        metrics: Mapping[str, Any] | None = None,
        custom: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``step`` if it is due (or ``force``); returns whether it saved.

        Raises:
            FileExistsError: ``step`` is already committed; nothing is touched.
        """
        self._ckptr.check_open()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        with self._state.lock:
            exists = step in self._state.steps and step not in self._state.deleting
        if exists:
            raise FileExistsError(
                f"step {step} is already committed at {self.step_path(step)}; save another step "
                "or delete this one first (CheckpointManager.delete)"
            )
        if not force and not self.should_save(step):
            return False
        clean_metrics = _plain_json(dict(metrics)) if metrics else None
        path = self.step_path(step)

        def committed() -> None:
            with self._state.lock:
                self._state.steps[step] = _Step(step, clean_metrics)
            if self._group.is_primary:
                self._in_background(self._apply_retention())
            else:  # the primary deletes; the others apply the same decision to their list
                doomed = self._steps_to_delete()
                with self._state.lock:
                    for s in doomed:
                        self._state.steps.pop(s, None)

        if isinstance(self._ckptr, AsyncCheckpointer):
            self._ckptr.save(path, args, metrics=clean_metrics, custom=custom, on_commit=committed)
        else:
            self._ckptr.save(path, args, metrics=clean_metrics, custom=custom)
            committed()
        return True

    # ---------------------------------------------------------------- retention
    def _steps_to_delete(self) -> list[int]:
        with self._state.lock:
            # Orbax steps are neither counted nor deleted: retention manages our own steps.
            metrics = {
                s: info.metrics
                for s, info in self._state.steps.items()
                if s not in self._state.deleting and not info.orbax
            }
        if self._options.max_to_keep is None or len(metrics) <= self._options.max_to_keep:
            return []
        ranked = self._ranked_by_metrics() if self._options.best_fn is not None else []
        return steps_to_delete(metrics, ranked, self._options)

    async def _apply_retention(self) -> None:
        doomed = self._steps_to_delete()
        if not doomed:
            return
        with self._state.lock:
            self._state.deleting |= set(doomed)
        for step in doomed:
            await self._delete_step(step)

    async def _delete_step(self, step: int) -> None:
        path = self.step_path(step)
        with self._state.lock:
            info = self._state.steps.get(step)
        try:
            if info is not None and info.orbax:
                await orbax.delete_step(path)
            else:
                await atomicity.delete_checkpoint(path.backend, path.path)
        except Exception:
            logger.warning("could not delete step %d at %s", step, path, exc_info=True)
            with self._state.lock:
                self._state.deleting.discard(step)
            raise
        with self._state.lock:
            self._state.steps.pop(step, None)
            self._state.deleting.discard(step)
        logger.info("deleted step %d at %s", step, path)

    def delete(self, step: int, *, orbax_ok: bool = False) -> None:
        """Deletes a committed step now (marker first: it is never half listed).

        A step written by Orbax is deleted only with ``orbax_ok=True``.
        """
        with self._state.lock:
            if step not in self._state.steps:
                raise FileNotFoundError(f"step {step} is not a committed step under {self._root}")
            if self._state.steps[step].orbax and not orbax_ok:
                raise PermissionError(
                    f"step {step} at {self.step_path(step)} was written by Orbax; cloudckpt "
                    "deletes it only when asked explicitly: delete(step, orbax_ok=True)"
                )
            self._state.deleting.add(step)
        if self._group.is_primary:
            self._ckptr.run_on_loop(self._delete_step(step))
        else:
            with self._state.lock:
                self._state.steps.pop(step, None)
                self._state.deleting.discard(step)

    async def _cleanup_uncommitted(self) -> None:
        deleted = await atomicity.cleanup_uncommitted(self._root.backend, self._root.path)
        if deleted:
            logger.info("cleaned up %d uncommitted step(s) under %s", len(deleted), self._root)

    def _in_background(self, coro: Any) -> None:
        future = self._ckptr.submit_to_loop(coro)
        with self._background_lock:
            self._background.add(future)
        future.add_done_callback(self._background_done)

    def _background_done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._background_lock:
            self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            logger.warning("background checkpoint maintenance failed: %s", future.exception())

    # ------------------------------------------------------------------ restore
    def restore(self, step: int | None = None, args: CheckpointArgs | None = None) -> Any:
        """Restores ``step`` (default: the latest committed step)."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint under {self._root}")
        return self._ckptr.restore(self.step_path(step), args)

    def metadata(self, step: int | None = None) -> StepMetadata:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint under {self._root}")
        return self._ckptr.metadata(self.step_path(step))

    # ---------------------------------------------------------------- lifecycle
    def save_timings(self) -> list[SaveTiming]:
        """Blocking and background time of recent saves (async managers only)."""
        return self._ckptr.timings() if isinstance(self._ckptr, AsyncCheckpointer) else []

    def is_saving_in_progress(self) -> bool:
        return isinstance(self._ckptr, AsyncCheckpointer) and self._ckptr.is_saving_in_progress()

    def wait_until_finished(self) -> None:
        """Waits for the save in flight (raising its failure) and for background deletions."""
        check_not_forked()
        if isinstance(self._ckptr, AsyncCheckpointer):
            self._ckptr.wait_until_finished()
        self._wait_background()

    def _wait_background(self) -> None:
        while True:
            with self._background_lock:
                pending = list(self._background)
            if not pending:
                return
            concurrent.futures.wait(pending)

    def close(self) -> None:
        if self._closed:
            return
        if in_forked_child():  # the loop and its work belong to the parent process
            self._closed = True
            self._ckptr.close()
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            self._ckptr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reached_preemption(step: int) -> bool:
    try:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # no preemption service running
        return False


def _plain_json(value: Any) -> Any:
    """Metrics as plain JSON values (numpy and JAX scalars become Python numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metric value {value} is not finite; metrics must be JSON numbers")
    return value
