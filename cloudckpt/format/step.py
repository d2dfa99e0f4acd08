"""Step metadata: the ``_CHECKPOINT_METADATA`` object of every checkpoint."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import atomicity
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import jsonio as _jsonio
from cloudckpt.format.early import read_document
from cloudckpt.storage.path import StoragePath

STEP_METADATA_NAME = "_CHECKPOINT_METADATA"
#: Bumped when the on-storage format changes incompatibly (docs/FORMAT.md). 2: data
#: objects are named after the attempt that wrote them (``<item>/@<attempt>/...``); 3: pack
#: grids in ``pytree.json`` (:mod:`cloudckpt.format.packed`).
FORMAT_VERSION = 3
#: What a recorded attempt id may look like: one path component, no dots (pytree.json's
#: data keys start with ``@<attempt>/``).
ATTEMPT_NAME = re.compile(r"[0-9A-Za-z_-]{1,64}")
#: Names an item may not take: they are the step's own objects.
RESERVED_NAMES = frozenset({STEP_METADATA_NAME, atomicity.MARKER_NAME, atomicity.CLAIM_NAME})
#: The identities of cloudckpt's own item handlers as step metadata records them (their
#: ``TYPESTR``s; on disk, so never changed): the tools recognise items by these alone.
PYTREE_TYPESTR = "cloudckpt.handlers.pytree.StandardCheckpointHandler"
JSON_TYPESTR = "cloudckpt.handlers.json.JsonCheckpointHandler"


def validate_item_name(name: object, *, saving: bool = False) -> str:
    """Checks that an item name is a safe, single path component.

    The same rule holds for names given to a save and for names read back
    from step metadata, so a stored name can never address outside its step.
    A new save also refuses names starting with ``@``: that prefix marks an
    attempt's own objects (docs/FORMAT.md), which clean-up tells apart by it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"item names must be non-empty strings, got {name!r}")
    problem = None
    if "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif ".." in name:
        problem = "contains '..'"
    elif name.startswith("__") or name.startswith("."):
        problem = "starts with '__' or '.'"
    elif saving and name.startswith(atomicity.ATTEMPT_TAG):
        problem = "starts with '@' (reserved for per-attempt object names)"
    elif name in RESERVED_NAMES:
        problem = "is reserved for the checkpoint's own objects"
    elif any(ord(c) < 32 for c in name) or atomicity.TMP_INFIX in name:
        problem = "contains control characters or a temporary-name marker"
    if problem:
        raise ValueError(f"invalid item name {name!r}: it {problem}; use a plain name like 'state'")
    return name


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
        attempt: The save attempt that wrote the step, whose commit marker names
            it too (None in steps saved before the step metadata recorded it).
    """

    item_handlers: dict[str, str] | str | None = None
    item_metadata: dict[str, Any] | Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    init_timestamp_nsecs: int | None = None
    commit_timestamp_nsecs: int | None = None
    custom: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    attempt: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("item_metadata")
        return out

    @classmethod
    def from_json(cls, data: Any, *, where: str) -> StepMetadata:
        """Validates a stored payload (untrusted) and types it.

        Raises:
            ValueError: a newer format version (upgrade cloudckpt).
            CorruptCheckpointError: anything the writer does not produce, such
                as an item name that is not a plain path component.
        """
        if type(data) is not dict:
            raise CorruptCheckpointError(f"{where} is not step metadata; restore another step")
        version = data.get("format_version")
        if type(version) is int and version > FORMAT_VERSION:
            raise ValueError(
                f"{where} has format version {version!r}; this cloudckpt reads up to "
                f"{FORMAT_VERSION}. Upgrade cloudckpt to read it."
            )
        problem = _problem(data)
        if problem:
            raise CorruptCheckpointError(
                f"{where} is corrupt: {problem}. It is not what cloudckpt writes; restore "
                "another step"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"item_metadata"}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("metrics", "custom"):
            values[name] = values.get(name) or {}
        return cls(**values)


def _problem(data: dict[str, Any]) -> str | None:
    """What makes a step-metadata payload one the writer cannot have produced, if anything."""
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        return f"format_version {version!r} is not a version number"
    handlers = data.get("item_handlers")
    if type(handlers) is dict:
        for name, typestr in handlers.items():
            try:
                validate_item_name(name)
            except ValueError as exc:
                return str(exc).split(";")[0]
            if type(typestr) is not str or not typestr:
                return f"item {name!r} has handler {typestr!r}, not a handler name"
    elif handlers is not None and (type(handlers) is not str or not handlers):
        return f"item_handlers {handlers!r} is neither a handler name nor a map of items"
    for name in ("metrics", "custom"):
        if data.get(name) is not None and type(data[name]) is not dict:
            return f"{name} is {type(data[name]).__name__}, not an object"
    attempt = data.get("attempt")
    if attempt is not None and (type(attempt) is not str or not ATTEMPT_NAME.fullmatch(attempt)):
        return f"attempt {attempt!r} is not an attempt id"
    for name in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
        value = data.get(name)
        if value is not None and (type(value) is not int or value < 0):
            return f"{name} {value!r} is not a timestamp"
    return None


async def write_step_metadata(directory: StoragePath, metadata: StepMetadata) -> None:
    target = directory / STEP_METADATA_NAME
    payload = _jsonio.dumps(metadata.to_json(), what=f"step metadata of {directory}")
    await write_object(target, payload)


async def read_step_metadata(directory: StoragePath) -> StepMetadata:
    """Reads and verifies the step metadata; FileNotFoundError when absent."""
    target = directory / STEP_METADATA_NAME
    step = await read_document(target, StepMetadata.from_json)
    if step is None:
        raise FileNotFoundError(f"no step metadata at {target}: not a cloudckpt checkpoint")
    return step


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
