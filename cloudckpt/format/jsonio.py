"""Checksummed JSON objects: every JSON object cloudckpt writes.

An object is ``{"crc32c": "<8 hex digits>", "data": <payload>}``, where the
checksum covers the canonical serialisation of the payload (sorted keys, no
whitespace). Reading re-serialises the payload and compares, so a flipped byte
anywhere is caught even when the result still parses.
"""

from __future__ import annotations

import json
from typing import Any

import google_crc32c

from cloudckpt.errors import CorruptCheckpointError


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def dumps(obj: Any, *, what: str = "object") -> bytes:
    """Encodes ``obj`` with its checksum; TypeError/ValueError if it is not JSON."""
    try:
        payload = _canonical(obj)
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"{what} is not JSON-serialisable ({exc}); use dicts, lists, strings, finite "
            "numbers, booleans and None"
        ) from None
    crc = google_crc32c.value(payload)
    return b'{"crc32c":"%08x","data":%s}' % (crc, payload)


def loads(data: bytes, *, where: str) -> Any:
    """Decodes and verifies an object written by :func:`dumps`."""
    try:
        envelope = json.loads(data)
        expected = envelope["crc32c"]
        payload = envelope["data"]
        actual = f"{google_crc32c.value(_canonical(payload)):08x}"
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # nested beyond reason
        raise CorruptCheckpointError(
            f"{where} is not a valid checksummed JSON object ({type(exc).__name__}: {exc})"
        ) from None
    if actual != expected:
        raise CorruptCheckpointError(
            f"checksum mismatch in {where} (stored {expected}, computed {actual}): the object "
            "is corrupt; restore another step"
        )
    return payload
