"""Changing checkpoints from the outside: copy, delete one step, collect garbage.

Every change goes through the atomicity strategies the library saves with, so
a copy is invisible until its marker is written last at the destination, a
deletion stops a step being committed before any data goes, and clean-up
never touches a committed step or (unless asked) a save still in progress.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import atomicity
from atomicity import CLAIM_NAME, MARKER_NAME, ObjectInfo
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.storage.path import StoragePath
from cloudckpt.tools.inspect import (
    Limiter,
    ProgressFactory,
    list_objects,
    no_progress,
    require_committed,
    step_sort_key,
)
from cloudckpt.tools.verify import VerifyReport, verify_contents

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- cp
@dataclass
class CopyReport:
    src: str
    dst: str
    n_objects: int
    nbytes: int
    replaced: bool
    verify: VerifyReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "n_objects": self.n_objects,
            "nbytes": self.nbytes,
            "replaced": self.replaced,
            "verify": None if self.verify is None else self.verify.to_json(),
        }


def destination_url(src: str, dst: str) -> str:
    """Where ``cp SRC DST`` copies to: ``DST``, or ``DST`` + SRC's step name if it ends in "/".

    Like cp(1) into a directory. Pure string work on the URLs as given, no I/O.

    Raises:
        ValueError: ``DST`` is a directory and ``SRC``'s last path segment is not a
            step name (empty, ``.`` or ``..``).
    """
    if dst.endswith("/"):
        name = src.rstrip("/").rsplit("/", 1)[-1]
        if name in ("", ".", ".."):
            raise ValueError(
                f"cannot copy {src} into the directory {dst}: its last path segment {name!r} "
                "is not a step name; give the destination step in full"
            )
        return dst + name
    return dst


async def copy_step(
    src: StoragePath,
    dst: StoragePath,
    *,
    force: bool = False,
    verify: bool = True,
    progress: ProgressFactory = no_progress,
) -> CopyReport:
    """Copies the committed checkpoint ``src`` to ``dst``, committing it last.

    The destination's own strategy is used: claim (``create``), copy every
    object except the source's marker and claim, verify the copy while it is
    still uncommitted, then ``finalize`` (marker last, or rename). A failed or
    corrupt copy is removed and never becomes visible.

    Raises:
        FileExistsError: ``dst`` is committed and ``force`` is False, or
            another save is in progress there.
        CorruptCheckpointError: the copy failed verification.
    """
    if src.backend is dst.backend:
        a, b = src.path.rstrip("/"), dst.path.rstrip("/")
        if a == b or b.startswith(a + "/") or a.startswith(b + "/"):
            raise ValueError(
                f"cannot copy {src} to {dst}: one lies inside the other; choose another destination"
            )
    try:
        objects = await require_committed(src)
    except ValueError:  # Orbax hook: an Orbax step is converted, not copied
        from cloudckpt import orbax
        from cloudckpt.tools import orbax as orbax_tools

        found = await orbax.probe(src)
        if found is None:
            raise
        return await orbax_tools.convert_step(
            src, found, dst, force=force, verify_copy=verify, progress=progress
        )
    todo = {rel: info for rel, info in objects.items() if rel not in (MARKER_NAME, CLAIM_NAME)}
    # Every key listed from the source is untrusted: it becomes a destination path.
    for rel in todo:
        problem = unsafe_key_problem(rel)
        if problem is not None:
            raise CorruptCheckpointError(
                f"{src} holds an object named {rel!r}, which {problem}; it cannot be copied "
                "because it would land outside the destination. Nothing was written; delete "
                "that object from the source or copy another step"
            )
    await refuse_symlinks(src, "copies")
    backend = dst.backend
    replaced = await clear_destination(dst, force=force)
    tmp = backend.default_temporary_path_class().from_final(dst.path, backend)
    await tmp.create()
    work = StoragePath(backend, tmp.get())
    report = CopyReport(src.url, dst.url, len(todo), sum(o.size for o in todo.values()), replaced)
    try:
        await _copy_objects(src, work, todo, progress(f"copy to {dst.url}", report.nbytes))
        copied = await list_objects(work)
        _check_listing(work, todo, copied)
        if verify:
            report.verify = await verify_contents(
                work,
                committed=False,
                progress=progress,
                objects=copied,
                label=f"verify copy at {dst.url}",
            )
            if not report.verify.ok:
                problems = report.verify.problems
                more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
                raise CorruptCheckpointError(
                    f"the copy at {dst} failed verification ({problems[0]}{more}); it was "
                    f"removed. Run `cloudckpt verify {src.url}`: the source may be corrupt"
                )
        await tmp.finalize()
    except BaseException:
        await remove_attempt(backend, tmp)
        raise
    if not await atomicity.is_committed(backend, dst.path):
        raise RuntimeError(f"the copy at {dst} was finalized but is not committed; report this")
    if report.verify is not None:
        report.verify.url = dst.url
    return report


def unsafe_key_problem(rel: str) -> str | None:
    """Why the relative key ``rel`` cannot be joined onto a destination, or None when it can.

    A safe key is one or more non-empty ``/``-separated segments, none ``.`` or
    ``..``, without backslashes or control characters: joined onto any
    directory it names a path inside that directory on every backend.
    """
    if not rel:
        return "is empty"
    if "\\" in rel:
        return "contains a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "contains control characters"
    if rel.startswith("/"):
        return "is absolute"
    for segment in rel.split("/"):
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
        if not segment:
            return "has an empty path segment"
    return None


async def refuse_symlinks(src: StoragePath, verb: str) -> None:
    """Refuses a source holding symbolic links (local disks): nothing is read through one."""
    links = await src.backend.symlinks_under(src.path)
    if links:
        more = f" and {len(links) - 1} more" if len(links) > 1 else ""
        raise PermissionError(
            f"{src} contains symbolic links ({links[0]}{more}); cloudckpt never {verb} what a "
            "link points to. Nothing was written; replace the links with regular files or "
            "remove them, then try again"
        )


async def clear_destination(dst: StoragePath, *, force: bool) -> bool:
    """Deletes a committed checkpoint at ``dst`` when ``force``; returns whether it did.

    Raises:
        FileExistsError: ``dst`` is committed and ``force`` is False.
    """
    if not await atomicity.is_committed(dst.backend, dst.path):
        return False
    if not force:
        raise FileExistsError(
            f"{dst} is already a committed checkpoint; pass --force to replace it "
            "(it is deleted before anything is written) or choose another destination"
        )
    await atomicity.delete_checkpoint(dst.backend, dst.path)
    return True


async def _copy_objects(
    src: StoragePath, dst: StoragePath, todo: dict[str, ObjectInfo], bar: Any
) -> None:
    limiter = Limiter()

    async def one(rel: str, info: ObjectInfo) -> None:
        async def transfer() -> None:
            data = await src.backend.get((src / rel).path, expected_size=info.size)
            if data is None:
                raise FileNotFoundError(
                    f"{src / rel} vanished during the copy; is someone deleting {src}?"
                )
            if len(data) != info.size:
                raise OSError(
                    f"{src / rel} changed during the copy ({info.size} bytes listed, "
                    f"{len(data)} read); is someone writing {src}?"
                )
            await dst.backend.put((dst / rel).path, data)

        await limiter.run(info.size, transfer)
        bar.advance(info.size)

    try:
        # Largest first: the long transfers start early and overlap the small ones.
        ordered = sorted(todo.items(), key=lambda kv: -kv[1].size)
        await asyncio.gather(*(one(rel, info) for rel, info in ordered))
    finally:
        bar.close()


def _check_listing(
    work: StoragePath, expected: dict[str, ObjectInfo], copied: dict[str, ObjectInfo]
) -> None:
    missing = sorted(rel for rel in expected if rel not in copied)
    sizes = sorted(
        rel for rel, info in expected.items() if rel in copied and copied[rel].size != info.size
    )
    if missing or sizes:
        raise OSError(
            f"the copy at {work} is incomplete: missing {missing[:3]}, wrong size {sizes[:3]}; "
            "run the copy again"
        )


async def remove_attempt(backend: Any, tmp: atomicity.TemporaryPath) -> None:
    """Best effort: revoke and delete this copy's attempt (never a committed one)."""
    try:
        if await tmp.abort():
            logger.warning("the copy at %s committed although it was interrupted", tmp.get())
    except Exception:  # `cloudckpt gc` finishes the job
        logger.warning("could not remove the failed copy at %s", tmp.get(), exc_info=True)


# ----------------------------------------------------------------------------------- rm
@dataclass
class RemoveReport:
    url: str
    n_objects: int
    nbytes: int
    deleted: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


async def remove_step(step: StoragePath, *, yes: bool) -> RemoveReport:
    """Deletes the committed checkpoint at ``step`` (marker first); dry run unless ``yes``."""
    try:
        objects = await require_committed(step)
    except ValueError:  # Orbax hook: `rm` is an explicit request, so Orbax steps may go
        from cloudckpt import orbax

        found = await orbax.probe(step)
        if found is None or not found.committed:
            raise
        report = RemoveReport(step.url, found.n_objects, found.nbytes, False)
        if yes:
            await orbax.delete_step(step)
            report.deleted = True
        return report
    report = RemoveReport(step.url, len(objects), sum(o.size for o in objects.values()), False)
    if yes:
        await atomicity.delete_checkpoint(step.backend, step.path)
        report.deleted = True
    return report


# ----------------------------------------------------------------------------------- gc
@dataclass
class GcEntry:
    """One uncommitted child of a root and what clean-up does with it."""

    name: str
    url: str
    n_objects: int
    nbytes: int
    # "delete", "spare", "deleted", "commit"/"committed" (a roll-forward), or
    # "sweep"/"swept" (late objects of fenced attempts in a committed step)
    action: str
    reason: str
    claim: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GcReport:
    root: str
    entries: list[GcEntry] = field(default_factory=list)
    committed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "committed_untouched": self.committed,
            "entries": [e.to_json() for e in self.entries],
        }


def _claim_summary(claim: atomicity.Claim | None) -> dict[str, Any] | None:
    if claim is None:
        return None
    return {"attempt": claim.attempt, "host": claim.host, "pid": claim.pid, "state": claim.state}


async def collect_garbage(root: StoragePath, *, yes: bool, include_live: bool) -> GcReport:
    """Finds uncommitted children of ``root`` and, with ``yes``, deletes the abandoned ones.

    Committed children (and committed claims) are never touched. Liveness is
    judged by the store's clock; each deletion is preceded by a request
    conditional on the exact claim version judged (see
    :func:`atomicity.settle`), so a save that claimed or renewed the step
    since the judgement wins and is spared.
    """
    backend = root.backend
    # Per step (and item, for attempt tags), not per object: only the uncommitted
    # children (about to be judged, and deleted with every object they hold) are
    # listed, for their sizes.
    children = await atomicity.scan(backend, root.path, tags=True)
    report = GcReport(root.url, committed=sum(1 for c in children if c.committed))
    for child in children:
        # A committed step is never deleted; only what fenced attempts wrote into it
        # late (under their own attempt's names) is swept out, by exact key.
        stray = await atomicity.sweep_fenced(backend, child, dry_run=not yes)
        if stray:
            report.entries.append(
                GcEntry(
                    child.name,
                    backend.url(child.path),
                    len(stray),
                    0,
                    "swept" if yes else "sweep",
                    f"{len(stray)} late object(s) of fenced attempts in a committed step",
                )
            )
    pending = [c for c in children if not c.committed]
    if not pending:
        return report
    for child in pending:
        if child.nbytes is None:
            infos = [info async for info in backend.list_prefix(child.path)]
            child.n_objects, child.nbytes = len(infos), sum(i.size for i in infos)
    now = await backend.now(atomicity.join(root.path, atomicity.CLAIM_NAME))
    for child in sorted(pending, key=lambda c: step_sort_key(c.name)):
        judged = await atomicity.settle(
            backend, child, include_live=include_live, dry_run=True, store_now=now
        )
        entry = GcEntry(
            child.name,
            backend.url(child.path),
            child.n_objects or 0,
            child.nbytes or 0,
            "delete" if judged.deleted else "commit" if judged.rolled_forward else "spare",
            judged.reason,
            _claim_summary(judged.claim),
        )
        report.entries.append(entry)
        if yes and (judged.deleted or judged.rolled_forward):
            # Judged again on the exact claim version it fences; the clock read above is
            # older than now, so it can only make a claim look younger (safe).
            done = await atomicity.settle(backend, child, include_live=include_live, store_now=now)
            entry.action = (
                "deleted" if done.deleted else "committed" if done.rolled_forward else "spare"
            )
            entry.reason = done.reason
    return report
