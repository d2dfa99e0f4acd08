"""Whether storage backs a validated ``pytree.json``: checked against one listing of the item.

A document can be valid and still claim more data than storage holds (a
shape of 2^40, a chunk grid of 10^9). Arrays are stored uncompressed, so the
size of every chunk object follows from the metadata, and a pack object is
exactly as long as its entries: one listing tells whether the bytes a read
is about to size an allocation for exist. The work is bounded by the
listing, never by a declared shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format.pytree import PackedStorage, PytreeDocument, ZarrStorage
from cloudckpt.storage.path import StoragePath

#: Missing chunks a leaf may lack and still be enumerated one by one (to name them).
GRID_SLACK = 5


def backing_problems(
    document: PytreeDocument,
    sizes: Mapping[str, int],
    leaves: Iterable[int] | None = None,
    *,
    limit: int | None = 5,
) -> list[tuple[str, str, str]]:
    """What the listing of the item lacks for ``leaves`` (default all).

    Returns ``(object, kind, detail)`` with kind ``missing`` or ``corrupt``;
    at most ``limit`` of them (None: all, which is still bounded by the
    listing: a leaf is enumerated only when its grid is within a few chunks
    of what is stored). ``sizes`` maps every object of the item
    (relative to it) to its size. A zarr leaf needs each of its chunks at the
    exact size its metadata implies; a pack object must be exactly as long as
    its entries. Work is bounded by the listing, never by a declared shape: a
    leaf declaring far more chunks than are stored is refused without
    enumerating them.
    """
    chunk_counts: dict[str, int] = {}  # zarr key (``[@<attempt>/]arrays/<i>``) -> chunks
    for rel in sizes:
        key, sep, _ = rel.partition("/c/")
        if sep:
            chunk_counts[key] = chunk_counts.get(key, 0) + 1
    numbers = range(len(document.leaves)) if leaves is None else sorted(set(leaves))
    problems: list[tuple[str, str, str]] = []
    objects: set[str] = set()
    for i in numbers:
        leaf = document.leaves[i]
        storage = leaf.storage
        name = f"leaf {leaf.path} ({leaf.dtype_name}{list(leaf.shape)})"
        if isinstance(storage, PackedStorage):
            objects.update(storage.objects())
        elif isinstance(storage, ZarrStorage):
            stored = chunk_counts.get(storage.key, 0)
            # A few missing chunks are named one by one; a grid far beyond the listing is not.
            if storage.n_chunks > 2 * stored + GRID_SLACK:
                detail = f"{name} declares {storage.n_chunks} chunks but {stored} are stored"
                problems.append((storage.key, "corrupt", detail))
                continue
            want = storage.object_bytes
            for _, key in storage.chunk_keys():
                size = sizes.get(key)
                if size is None:
                    problems.append((key, "missing", f"chunk of {name} is not in storage"))
                elif size != want:
                    detail = f"chunk of {name} is {size} bytes; its metadata implies {want}"
                    problems.append((key, "corrupt", detail))
                if limit is not None and len(problems) >= limit:
                    return problems
        if limit is not None and len(problems) >= limit:
            return problems
    for obj in sorted(objects):
        size, want = sizes.get(obj), document.pack_sizes[obj]
        if size is None:
            problems.append((obj, "missing", "pack object is not in storage"))
        elif size != want:
            detail = f"pack object is {size} bytes; its entries need exactly {want}"
            problems.append((obj, "corrupt", detail))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def check_backing(
    document: PytreeDocument, sizes: Mapping[str, int], leaves: Iterable[int], *, where: str
) -> None:
    """Raises CorruptCheckpointError when the listing does not back ``leaves``."""
    problems = backing_problems(document, sizes, leaves)
    if problems:
        text = "; ".join(f"{where}/{obj}: {detail}" for obj, _, detail in problems)
        raise CorruptCheckpointError(
            f"the stored objects do not match the pytree metadata ({text}); the checkpoint is "
            "corrupt or incomplete, restore another step"
        )


async def list_item(directory: StoragePath) -> dict[str, int]:
    """Sizes of every object under ``directory``, relative to it: one (paginated) listing."""
    prefix = directory.path.rstrip("/") + "/"
    return {
        info.path[len(prefix) :]: info.size
        async for info in directory.backend.list_prefix(directory.path)
        if info.path.startswith(prefix)
    }


async def check_stored(
    directory: StoragePath, document: PytreeDocument, leaves: Iterable[int]
) -> None:
    """Checks that storage backs the array leaves about to be read, before any allocation.

    One listing of the item when any of ``leaves`` has stored bytes; none otherwise.
    """
    wanted = [
        i for i in leaves if isinstance(document.leaves[i].storage, (ZarrStorage, PackedStorage))
    ]
    if wanted:
        check_backing(document, await list_item(directory), wanted, where=str(directory))
