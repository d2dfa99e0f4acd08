"""``cloudckpt ls/inspect/verify/cp`` on Orbax steps: describe, verify, convert.

Conversion reads each item of the Orbax step to host memory (one item at a
time), writes it with cloudckpt's own handlers under the destination's
temporary path, writes step metadata, verifies the copy (every checksum)
while it is still uncommitted, and only then commits it with the
destination's strategy (marker or rename), exactly like ``cloudckpt cp``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import atomicity
from atomicity import ObjectInfo
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format.step import write_step_metadata
from cloudckpt.handlers.json import JsonCheckpointHandler, JsonSave
from cloudckpt.handlers.pytree import StandardCheckpointHandler, StandardSave
from cloudckpt.orbax import (
    JSON_ITEM_FILE,
    OrbaxStep,
    OrbaxTree,
    item_metadata,
    list_steps,
    open_tree,
    probe,
    require_committed,
    restore_item,
    step_metadata,
)
from cloudckpt.storage.path import StoragePath
from cloudckpt.tools.inspect import ProgressFactory, list_objects, no_progress, step_sort_key
from cloudckpt.tools.transfer import CopyReport, clear_destination, refuse_symlinks, remove_attempt
from cloudckpt.tools.verify import (
    Problem,
    VerifyReport,
    classify_tensorstore_error,
    verify_contents,
)


def _where(step: StoragePath, name: str) -> StoragePath:
    return step / name if name else step


def _leaf_rows(tree: OrbaxTree) -> list[dict[str, Any]]:
    engine = ("OCDBT, " if tree.use_ocdbt else "") + ("zarr v3" if tree.use_zarr3 else "zarr v2")
    rows = []
    for leaf in tree.leaves:
        if leaf.kind == "str":
            rows.append(
                {
                    "path": leaf.path,
                    "dtype": "str",
                    "shape": [],
                    "sharding": None,
                    "nbytes": leaf.nbytes,
                    "storage": "orbax _strings.json",
                }
            )
            continue
        rows.append(
            {
                "path": leaf.path,
                "dtype": leaf.dtype_name,
                "shape": list(leaf.shape),
                "sharding": None,
                "nbytes": leaf.nbytes,
                "storage": f"orbax {engine}",
            }
        )
    return rows


async def describe(
    step: StoragePath, info: OrbaxStep, objects: dict[str, ObjectInfo] | None = None
) -> dict[str, Any]:
    """What ``cloudckpt inspect`` shows for an Orbax step; reads no array data.

    ``objects`` is the step's listing when the caller already has it.
    """
    require_committed(step, info)
    if objects is None:
        objects = await list_objects(step)
    meta = await step_metadata(step, info, with_items=False)
    out: dict[str, Any] = {
        "url": step.url,
        "committed": True,
        "format": "orbax",
        "n_objects": len(objects),
        "nbytes": sum(o.size for o in objects.values()),
        "metadata": meta.to_json(),
        "items": [],
    }
    for item in info.items:
        prefix = item.prefix()
        entry: dict[str, Any] = {
            "name": item.name,
            "handler": f"orbax {item.kind}",
            "kind": item.kind if item.kind != "unsupported" else "other",
            "n_objects": sum(1 for rel in objects if rel.startswith(prefix)),
            "stored_bytes": sum(o.size for rel, o in objects.items() if rel.startswith(prefix)),
        }
        if item.kind == "pytree":
            tree, _ = await open_tree(_where(step, item.name), 1 << 20)
            entry["leaves"] = _leaf_rows(tree)
            entry["nbytes"] = sum(leaf["nbytes"] for leaf in entry["leaves"])
        elif item.kind == "json":
            entry["value"] = await item_metadata(step, item)
        else:
            entry["objects"] = [f"(not supported: {item.detail})"]
        out["items"].append(entry)
    return out


async def verify(
    step: StoragePath,
    info: OrbaxStep,
    objects: dict[str, ObjectInfo] | None = None,
    *,
    progress: ProgressFactory = no_progress,
) -> VerifyReport:
    """Reads and decodes everything an Orbax step's metadata references.

    Orbax stores no checksum over array bytes, so this catches missing,
    truncated or undecodable data and broken metadata, not a flipped bit
    inside an uncompressed chunk (noted in the report).
    """
    require_committed(step, info)
    if objects is None:
        objects = await list_objects(step)
    report = VerifyReport(
        url=step.url, n_objects=len(objects), nbytes=sum(o.size for o in objects.values())
    )
    bar = progress(f"verify {step.url}", report.nbytes)
    try:
        for item in info.items:
            where = _where(step, item.name)
            if item.kind == "unsupported":
                report.problems.append(
                    Problem("unreadable", where.url, f"not supported: {item.detail}")
                )
                continue
            if item.kind == "json":
                try:
                    await item_metadata(step, item)
                    report.objects_read += 1
                except (OSError, ValueError) as exc:
                    report.problems.append(
                        Problem("corrupt", (where / JSON_ITEM_FILE).url, str(exc))
                    )
                continue
            try:
                tree, reader = await open_tree(where, 256 << 20)
            except Exception as exc:
                report.problems.append(
                    Problem(
                        classify_tensorstore_error(exc),
                        where.url,
                        str(exc).splitlines()[0],
                    )
                )
                continue
            report.objects_read += 1

            async def read(
                i: int,
                tree: OrbaxTree = tree,
                reader: Any = reader,
                where: StoragePath = where,
            ) -> None:
                leaf = tree.leaves[i]
                try:
                    await reader.leaf_to_host(i)
                    report.objects_read += 1  # one array (all its chunks) read and decoded
                except Exception as exc:
                    text = str(exc)
                    kind = classify_tensorstore_error(exc)
                    if "missing data" in text:
                        kind = "missing"
                    elif kind == "unreadable" and isinstance(exc, CorruptCheckpointError):
                        kind = "corrupt"
                    report.problems.append(
                        Problem(kind, f"{where.url} leaf {leaf.path}", str(exc).splitlines()[0])
                    )

            await asyncio.gather(*(read(i) for i in range(len(tree.leaves))))
        prefix_bytes = sum(o.size for o in objects.values())
        bar.advance(prefix_bytes)
    finally:
        bar.close()
    report.notes.append(
        "Orbax step: 'objects read' counts arrays and JSON documents; every array was read "
        "and decoded and all metadata parsed; Orbax writes no "
        "checksum over array bytes, so a flipped bit inside chunk data cannot be detected "
        "(convert with `cloudckpt cp` to get crc32c on every chunk)"
    )
    report.problems.sort(key=lambda p: p.url)
    return report


async def convert_step(
    src: StoragePath,
    info: OrbaxStep,
    dst: StoragePath,
    *,
    force: bool = False,
    verify_copy: bool = True,
    progress: ProgressFactory = no_progress,
) -> CopyReport:
    """Writes the Orbax step ``src`` as a cloudckpt step at ``dst``, committed last."""
    require_committed(src, info)
    for item in info.items:
        if item.kind == "unsupported":
            from cloudckpt.orbax import UnsupportedOrbaxLayoutError

            raise UnsupportedOrbaxLayoutError(
                f"cannot convert {src}: item {item.name!r} is not supported ({item.detail})"
            )
    # As for `cloudckpt cp` of our own steps: tensorstore would follow a link on a
    # file system, so the conversion would copy what it points to.
    await refuse_symlinks(src, "converts")
    backend = dst.backend
    replaced = await clear_destination(dst, force=force)
    meta = await step_metadata(src, info, with_items=False)
    tmp = backend.default_temporary_path_class().from_final(dst.path, backend)
    init_ns = time.time_ns()
    await tmp.create()
    work = StoragePath(backend, tmp.get())
    report = CopyReport(src.url, dst.url, info.n_objects, info.nbytes, replaced)
    bar = progress(f"convert {src.url} -> {dst.url}", info.nbytes)
    try:
        single = [i for i in info.items if i.name == ""]
        for item in info.items:
            value = await restore_item(src, item, None)
            target = work / item.name if item.name else work
            handler: Any
            if item.kind == "pytree":
                handler, args = StandardCheckpointHandler(), StandardSave(value)
            else:
                handler, args = JsonCheckpointHandler(), JsonSave(value)
            handler.bind_process_group(0, (0,))
            await asyncio.gather(*handler.async_save(target, args))
            await handler.finalize(target)
            bar.advance(
                sum(o.size for rel, o in (await list_objects(_where(src, item.name))).items())
            )
            del value
        meta.item_handlers = (
            StandardCheckpointHandler.typestr()
            if single and single[0].kind == "pytree"
            else {
                i.name: (
                    StandardCheckpointHandler.typestr()
                    if i.kind == "pytree"
                    else JsonCheckpointHandler.typestr()
                )
                for i in info.items
            }
        )
        meta.custom = {"converted_from_orbax": src.url, **meta.custom}
        meta.init_timestamp_nsecs = meta.init_timestamp_nsecs or init_ns
        meta.commit_timestamp_nsecs = time.time_ns()
        await write_step_metadata(work, meta)
        if verify_copy:
            report.verify = await verify_contents(
                work, committed=False, progress=progress, label=f"verify {dst.url}"
            )
            if not report.verify.ok:
                problems = report.verify.problems
                raise CorruptCheckpointError(
                    f"the conversion at {dst} failed verification ({problems[0]}); it was removed"
                )
            report.verify.url = dst.url
        copied = await list_objects(work)
        report.n_objects, report.nbytes = len(copied), sum(o.size for o in copied.values())
        await tmp.finalize()
    except BaseException:
        await remove_attempt(backend, tmp)
        raise
    finally:
        bar.close()
    if not await atomicity.is_committed(backend, dst.path):
        raise RuntimeError(
            f"the conversion at {dst} was finalized but is not committed; report this"
        )
    return report


class _OneBar:
    """Routes every progress request of a multi-step copy to one bar."""

    def __init__(self, factory: ProgressFactory, label: str, total: int) -> None:
        self.bar = factory(label, total)

    def __call__(self, label: str, total: int) -> Any:
        bar = self.bar
        if label.startswith("verify"):
            return _Silent()

        class _Share:
            def advance(self, nbytes: int) -> None:
                bar.advance(nbytes)

            def close(self) -> None:
                pass

        return _Share()


class _Silent:
    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


async def copy_all(
    src_root: StoragePath,
    dst_root: StoragePath,
    *,
    force: bool = False,
    verify_copy: bool = True,
    progress: ProgressFactory = no_progress,
) -> dict[str, Any]:
    """Copies every committed step of ``src_root`` (cloudckpt's and Orbax's) to ``dst_root``.

    Orbax steps are converted, cloudckpt steps copied; steps already committed
    at the destination are skipped unless ``force``. One progress bar.
    """
    from cloudckpt.tools.transfer import copy_step

    ours = await atomicity.list_committed(src_root.backend, src_root.path, sizes=True)
    theirs = [s for s in await list_steps(src_root) if s.committed]
    todo = sorted(
        [(c.name, c.nbytes) for c in ours] + [(s.name, s.nbytes) for s in theirs],
        key=lambda t: step_sort_key(t[0]),
    )
    if not todo:
        raise FileNotFoundError(f"no committed checkpoints under {src_root} to copy")
    orbax_names = {s.name for s in theirs}
    bar = _OneBar(progress, f"copy {len(todo)} steps to {dst_root.url}", sum(n for _, n in todo))
    done: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        for name, _ in todo:
            src, dst = src_root / name, dst_root / name
            if not force and await atomicity.is_committed(dst.backend, dst.path):
                skipped.append(name)
                bar.bar.advance(dict(todo)[name])
                continue
            if name in orbax_names:
                found = await probe(src)
                if found is None or not found.committed:
                    raise FileNotFoundError(f"{src} vanished or changed during the copy")
                report = await convert_step(
                    src, found, dst, force=force, verify_copy=verify_copy, progress=bar
                )
            else:
                report = await copy_step(src, dst, force=force, verify=verify_copy, progress=bar)
            entry = report.to_json()
            entry["converted_from_orbax"] = name in orbax_names
            done.append(entry)
    finally:
        bar.bar.close()
    return {"src": src_root.url, "dst": dst_root.url, "copied": done, "skipped": skipped}
