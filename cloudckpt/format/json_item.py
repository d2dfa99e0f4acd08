"""A JSON item: one checksummed object, ``<item>/data.json``."""

from __future__ import annotations

from typing import Any

from cloudckpt.format import jsonio
from cloudckpt.format.step import write_object
from cloudckpt.storage.path import StoragePath

#: The one object a JSON item is stored as, under the item's prefix.
DATA_NAME = "data.json"


def encode_json_item(value: Any, *, what: str) -> bytes:
    """The stored bytes of ``value``; TypeError/ValueError naming ``what`` if it is not JSON.

    Encoding is the save's copy: a later change to ``value`` changes nothing.
    """
    return jsonio.dumps(value, what=what)


async def write_json_item(directory: StoragePath, payload: bytes) -> None:
    """Writes bytes from :func:`encode_json_item` as the item at ``directory``."""
    await write_object(directory / DATA_NAME, payload)


async def read_json_item(directory: StoragePath) -> Any:
    """Reads and checksums the JSON item at ``directory``.

    Raises:
        FileNotFoundError: the item has no ``data.json``.
        CorruptCheckpointError: the object is not a checksummed JSON object, or
            its checksum does not match.
    """
    target = directory / DATA_NAME
    data = await target.backend.get(target.path)
    if data is None:
        raise FileNotFoundError(f"no JSON item at {target}")
    return jsonio.loads(data, where=str(target))
