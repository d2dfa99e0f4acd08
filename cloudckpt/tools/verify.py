"""``cloudckpt verify``: read every object of a step and check every checksum.

What is checked:

* checksummed JSON envelopes: step metadata, ``pytree.json``, JSON items;
* every zarr array chunk by chunk through tensorstore, with missing chunks
  an error (``fill_missing_data_reads`` off); the crc32c codec in the chain
  catches flipped bytes; ``zarr.json`` must match the pytree metadata;
* ``pytree.json`` through the handler's own validating reader (entries tile
  their leaf, keys stay inside the item, shapes and chunk grids agree), and
  that the listing backs it (every chunk and pack object at its exact size)
  before any chunk is opened;
* packed leaves: the crc32c stored after every entry;
* that every object the metadata references exists;
* the commit marker (for a committed step).

Objects no metadata references are read too and reported as notes. Reads
are bounded in bytes and requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import tensorstore as ts

import atomicity
from atomicity import CLAIM_NAME, MARKER_NAME, ObjectInfo
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import jsonio as _jsonio
from cloudckpt.format.backing import backing_problems
from cloudckpt.format.json_item import DATA_NAME
from cloudckpt.format.layout import PackEntry, entry_data, zarr_json_agrees
from cloudckpt.format.pytree import METADATA_NAME as PYTREE_NAME
from cloudckpt.format.pytree import (
    PackedStorage,
    ZarrStorage,
    parse_pytree,
)
from cloudckpt.format.step import STEP_METADATA_NAME, StepMetadata
from cloudckpt.storage.path import StoragePath
from cloudckpt.tools.inspect import (
    Item,
    Limiter,
    Progress,
    ProgressFactory,
    committed_or_orbax,
    items_of_step,
    list_objects,
    no_progress,
    prefix_of,
)

#: Missing or mis-sized objects of one item reported one by one (the rest are counted).
MAX_BACKING_PROBLEMS = 1000


@dataclass
class Problem:
    """Something wrong with one object: ``corrupt``, ``missing`` or ``unreadable``."""

    kind: str
    url: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.url}: {self.detail}"


@dataclass
class VerifyReport:
    url: str
    n_objects: int = 0
    nbytes: int = 0
    checksums: int = 0
    objects_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return out


class _Verifier:
    def __init__(
        self,
        step: StoragePath,
        objects: dict[str, ObjectInfo],
        report: VerifyReport,
        progress: Progress,
    ) -> None:
        self.step = step
        self.objects = objects
        self.report = report
        self.progress = progress
        self.limiter = Limiter()
        self.referenced: set[str] = set()

    def url(self, rel: str) -> str:
        return (self.step / rel).url if rel else self.step.url

    def problem(self, kind: str, rel: str, detail: str) -> None:
        self.report.problems.append(Problem(kind, self.url(rel), detail))

    def seen(self, rel: str) -> None:
        info = self.objects.get(rel)
        if info is not None:
            self.report.objects_read += 1
            self.progress.advance(info.size)

    def expect(self, rel: str, referrer: str) -> bool:
        """Records a referenced object; reports it missing when the listing lacks it."""
        self.referenced.add(rel)
        if rel not in self.objects:
            self.problem("missing", rel, f"referenced by {referrer} but not in storage")
            return False
        return True

    async def get(self, rel: str) -> bytes | None:
        info = self.objects[rel]
        backend = self.step.backend
        path = (self.step / rel).path
        try:
            data = await self.limiter.run(
                info.size, lambda: backend.get(path, expected_size=info.size)
            )
        except OSError as exc:
            self.problem("unreadable", rel, str(exc))
            return None
        self.seen(rel)
        if data is None:
            self.problem("missing", rel, "listed but gone when read")
        return data

    async def envelope(self, rel: str, referrer: str) -> Any:
        """Reads a checksummed JSON object; None (with a problem recorded) when bad."""
        if not self.expect(rel, referrer):
            return None
        data = await self.get(rel)
        if data is None:
            return None
        try:
            value = _jsonio.loads(data, where=self.url(rel))
        except CorruptCheckpointError as exc:
            self.problem("corrupt", rel, str(exc).replace(self.url(rel), "this object"))
            return None
        self.report.checksums += 1
        return value

    # --------------------------------------------------------------------- step
    async def run(self, *, committed: bool) -> None:
        if committed:
            await self._marker()
        if CLAIM_NAME in self.objects:
            self.referenced.add(CLAIM_NAME)
            data = await self.get(CLAIM_NAME)
            if data is not None and atomicity.Claim.from_bytes(data) is None:
                self.report.notes.append(f"{self.url(CLAIM_NAME)} is not a readable claim")
        raw = await self.envelope(STEP_METADATA_NAME, "every checkpoint")
        metadata = None
        if raw is not None:
            try:
                metadata = StepMetadata.from_json(raw, where=self.url(STEP_METADATA_NAME))
            except ValueError as exc:
                self.problem("corrupt", STEP_METADATA_NAME, str(exc))
        items = items_of_step(self.step, metadata or StepMetadata(), self.objects)
        await asyncio.gather(*(self._item(item) for item in items))
        stray = sorted(set(self.objects) - self.referenced)
        if stray:
            # Read them too, so every object of the step is read at least once.
            await asyncio.gather(*(self.get(rel) for rel in stray))
            shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
            self.report.notes.append(
                f"{len(stray)} object(s) not referenced by any metadata (read, not checked): "
                + shown
            )

    async def _marker(self) -> None:
        self.referenced.add(MARKER_NAME)
        data = await self.get(MARKER_NAME)
        if data is None:
            return
        if atomicity.marker_attempt(data) is None:
            self.problem("corrupt", MARKER_NAME, "the commit marker is not valid JSON")

    async def _item(self, item: Item) -> None:
        prefix = prefix_of(item)
        where = f"item {item.name!r}" if item.name else "the checkpoint"
        if item.kind == "json":
            await self.envelope(prefix + DATA_NAME, where)
        elif item.kind == "pytree":
            await self._pytree(item, prefix, where)
        else:
            mine = [rel for rel in self.objects if rel.startswith(prefix)] if prefix else []
            self.referenced.update(mine)
            await asyncio.gather(*(self.get(rel) for rel in mine))
            self.report.notes.append(
                f"{where}: saved by {item.typestr}, whose format carries no checksums known "
                f"to the CLI; its {len(mine)} object(s) were read, not checked"
            )

    # ------------------------------------------------------------------- pytree
    async def _pytree(self, item: Item, prefix: str, where: str) -> None:
        raw = await self.envelope(prefix + PYTREE_NAME, where)
        if raw is None:
            return
        try:
            document = parse_pytree(raw, where="this object")
        except ValueError as exc:  # CorruptCheckpointError, or a newer format
            self.problem("corrupt", prefix + PYTREE_NAME, str(exc))
            return
        # The listing must back every leaf before anything is opened or sized from it.
        sizes = {
            rel[len(prefix) :]: o.size for rel, o in self.objects.items() if rel.startswith(prefix)
        }
        # Every leaf is checked (bounded by the listing); the first problems are reported.
        broken: set[str] = set()
        problems = backing_problems(document, sizes, limit=None)
        for n, (obj, kind, detail) in enumerate(problems):
            if n < MAX_BACKING_PROBLEMS:
                self.problem(kind, prefix + obj, detail)
            self.referenced.add(prefix + obj)
            broken.add(obj)
        if len(problems) > MAX_BACKING_PROBLEMS:
            self.report.notes.append(
                f"{where}: {len(problems) - MAX_BACKING_PROBLEMS} more missing or mis-sized "
                "objects not listed one by one"
            )
        packs: dict[str, list[tuple[str, PackEntry]]] = {}
        tasks = []
        for leaf in document.leaves:
            storage = leaf.storage
            name = f"leaf {leaf.path} of {where}"
            if isinstance(storage, ZarrStorage):
                self.referenced.add(prefix + storage.key + "/zarr.json")
                if storage.key not in broken:  # else its grid is beyond what is stored
                    tasks.append(self._zarr(prefix + storage.key, storage, name, broken))
                else:
                    self.referenced.update(
                        rel for rel in self.objects if rel.startswith(prefix + storage.key + "/")
                    )
            elif isinstance(storage, PackedStorage):
                for entry in storage.entries:
                    packs.setdefault(entry.obj, []).append((name, entry))
        for obj, entries in packs.items():
            self.referenced.add(prefix + obj)
            if obj not in broken:
                tasks.append(self._pack(prefix + obj, entries))
        await asyncio.gather(*tasks)

    async def _pack(self, rel: str, entries: list[tuple[str, PackEntry]]) -> None:
        data = await self.get(rel)
        if data is None:
            return
        bad = []
        for name, entry in entries:
            if entry_data(data, entry.offset, entry.nbytes) is None:
                bad.append(f"{name} (bytes {entry.offset}-{entry.end})")
            else:
                self.report.checksums += 1
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            self.problem("corrupt", rel, "checksum mismatch in " + "; ".join(bad[:3]) + more)

    async def _zarr(self, rel: str, storage: ZarrStorage, name: str, skip: set[str]) -> None:
        if not self.expect(f"{rel}/zarr.json", name):
            return
        data = await self.get(f"{rel}/zarr.json")
        if data is None:
            return
        metadata = storage.metadata
        if not zarr_json_agrees(data, metadata):
            self.problem("corrupt", f"{rel}/zarr.json", f"does not match {name}'s metadata")
        itemsize = storage.stored.itemsize
        location = self.step / rel
        spec = {
            "driver": "zarr3",
            "kvstore": location.kvstore_spec(),
            "metadata": metadata,
            "assume_metadata": True,
            "fill_missing_data_reads": False,
            "recheck_cached_data": False,
        }
        try:
            store = await ts.open(spec, context=location.backend.tensorstore_context())
        except Exception as exc:  # tensorstore raises ValueError for most errors
            self.problem("unreadable", rel, f"tensorstore could not open {name}: {exc}")
            return
        chunk = storage.chunk

        async def read_chunk(position: tuple[int, ...], key: str) -> None:
            chunk_rel = f"{rel}/{key[len(storage.key) + 1 :]}"
            self.referenced.add(chunk_rel)
            region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(position, chunk, strict=True))
            nbytes = math.prod(chunk) * itemsize
            try:
                await self.limiter.run(nbytes, lambda: store[region].read())
            except Exception as exc:  # tensorstore raises ValueError with a status text
                self.problem(classify_tensorstore_error(exc), chunk_rel, _first_line(exc))
                return
            finally:
                self.seen(chunk_rel)
            self.report.checksums += 1

        # Bounded by the listing: backing_problems found every one of these chunks stored.
        await asyncio.gather(*(read_chunk(p, k) for p, k in storage.chunk_keys() if k not in skip))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def classify_tensorstore_error(exc: BaseException) -> str:
    text = str(exc)
    if "DATA_LOSS" in text or "digest mismatch" in text.lower() or "checksum" in text.lower():
        return "corrupt"
    if "NOT_FOUND" in text:
        return "missing"
    return "unreadable"


async def verify_contents(
    location: StoragePath,
    *,
    committed: bool,
    progress: ProgressFactory = no_progress,
    objects: dict[str, ObjectInfo] | None = None,
    label: str | None = None,
) -> VerifyReport:
    """Reads every object under ``location`` and checks every checksum.

    ``committed`` says whether a commit marker is expected (False for a copy
    being verified before it is finalized).
    """
    if objects is None:
        objects = await list_objects(location)
    report = VerifyReport(
        url=location.url, n_objects=len(objects), nbytes=sum(o.size for o in objects.values())
    )
    bar = progress(label or f"verify {location.url}", report.nbytes)
    try:
        await _Verifier(location, objects, report, bar).run(committed=committed)
    finally:
        bar.close()
    report.problems.sort(key=lambda p: p.url)
    return report


async def verify_step(
    step: StoragePath, *, progress: ProgressFactory = no_progress
) -> VerifyReport:
    """Verifies the committed checkpoint at ``step`` (see the module docstring)."""
    objects, found = await committed_or_orbax(step)
    if found is not None:  # Orbax hook: what can be checked of a step Orbax wrote
        from cloudckpt.tools import orbax as orbax_tools

        return await orbax_tools.verify(step, found, objects, progress=progress)
    return await verify_contents(step, committed=True, progress=progress, objects=objects)
