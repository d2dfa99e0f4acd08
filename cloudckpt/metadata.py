"""Step metadata: the ``_CHECKPOINT_METADATA`` object of every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cloudckpt import _jsonio
from cloudckpt.path import StoragePath

STEP_METADATA_NAME = "_CHECKPOINT_METADATA"
#: Bumped when the on-storage format changes incompatibly (docs/FORMAT.md).
FORMAT_VERSION = 1


@dataclass
class StepMetadata:
    """What a checkpoint says about itself, readable without loading any data.

    Attributes:
        item_handlers: ``{item: handler typestr}`` for a composite checkpoint,
            or one typestr for a single-handler checkpoint.
        item_metadata: Per-item metadata from each item's handler (filled in
            when read through a checkpointer; None for an item whose handler
            could not describe it).
        metrics: User metrics given at save time.
        init_timestamp_nsecs: When the save started.
        commit_timestamp_nsecs: When all data was written, just before commit.
        custom: User fields given at save time.
        format_version: The on-storage format version.
    """

    item_handlers: dict[str, str] | str | None = None
    item_metadata: dict[str, Any] | Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    init_timestamp_nsecs: int | None = None
    commit_timestamp_nsecs: int | None = None
    custom: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("item_metadata")
        return out

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> StepMetadata:
        if not isinstance(data, dict):
            raise ValueError(f"{where} is not step metadata")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{where} has format version {version!r}; this cloudckpt reads up to "
                f"{FORMAT_VERSION}. Upgrade cloudckpt to read it."
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"item_metadata"}
        return cls(**{k: v for k, v in data.items() if k in known})


async def write_step_metadata(directory: StoragePath, metadata: StepMetadata) -> None:
    target = directory / STEP_METADATA_NAME
    payload = _jsonio.dumps(metadata.to_json(), what=f"step metadata of {directory}")
    await write_object(target, payload)


async def read_step_metadata(directory: StoragePath) -> StepMetadata:
    """Reads and verifies the step metadata; FileNotFoundError when absent."""
    target = directory / STEP_METADATA_NAME
    data = await target.backend.get(target.path)
    if data is None:
        raise FileNotFoundError(f"no step metadata at {target}: not a cloudckpt checkpoint")
    return StepMetadata.from_json(_jsonio.loads(data, where=str(target)), where=str(target))


async def write_object(target: StoragePath, data: bytes) -> None:
    """Writes one object of a save in progress.

    On stores without atomic rename the object sits at its final key, so it is
    created create-only: a second writer can never silently replace it.
    """
    backend = target.backend
    if backend.supports_atomic_rename:
        await backend.put(target.path, data)
    elif not await backend.put_if_absent(target.path, data):
        raise FileExistsError(f"{target} already exists; another save wrote it")
