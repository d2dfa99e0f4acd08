"""JSON items: small configuration and bookkeeping objects."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from cloudckpt.format.json_item import (
    encode_json_item,
    read_json_item,
    write_json_item,
)
from cloudckpt.format.step import JSON_TYPESTR
from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.handlers.base import AsyncCheckpointHandler
from cloudckpt.handlers.registry import register_with_handler
from cloudckpt.storage.path import StoragePath


class JsonCheckpointHandler(AsyncCheckpointHandler):
    """Saves one JSON-serialisable object per item, as one checksummed object.

    Every process validates the object; the primary process alone writes it.
    """

    TYPESTR = JSON_TYPESTR  # on disk: never change

    def __init__(self) -> None:
        self._writes = True

    def bind_process_group(self, primary_host: int, members: Sequence[int]) -> None:
        import jax

        self._writes = jax.process_index() == primary_host

    def async_save(self, directory: StoragePath, args: CheckpointArgs) -> Sequence[Awaitable[None]]:
        if not isinstance(args, JsonSave):
            raise TypeError(f"JsonCheckpointHandler saves JsonSave args, got {type(args).__name__}")
        # Serialising now is the copy: later mutation of args.item changes nothing.
        payload = encode_json_item(args.item, what=f"JsonSave item for {directory}")
        return [write_json_item(directory, payload)] if self._writes else []

    async def restore(self, directory: StoragePath, args: CheckpointArgs | None = None) -> Any:
        return await read_json_item(directory)


@register_with_handler(JsonCheckpointHandler, for_save=True)
@dataclass(frozen=True)
class JsonSave(CheckpointArgs):
    """Save a JSON-serialisable object (dicts, lists, strings, numbers, bools, None)."""

    item: Any


@register_with_handler(JsonCheckpointHandler, for_restore=True)
@dataclass(frozen=True)
class JsonRestore(CheckpointArgs):
    """Restore a JSON item."""


JsonCheckpointHandler.default_restore_args = JsonRestore
