"""Mutations of a stored checkpoint for the hostile-checkpoint fuzz campaign (fuzz_worker).

Each generator reads what it mutates through :class:`Store` (raw object
access, bypassing cloudckpt's format code) and returns a :class:`Mutation`:
the objects to write (or delete), the class it belongs to, and how strictly
a successful read must match what was saved (``level``, see fuzz_worker).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import google_crc32c

from cloudckpt.engine.loop import LoopThread
from cloudckpt.format import jsonio as _jsonio
from cloudckpt.storage.path import StoragePath

STEPS = (1, 2)
JSON_OBJECTS = ("_CHECKPOINT_METADATA", "state/pytree.json", "meta/data.json")


# ------------------------------------------------------------------------------ storage
class Store:
    """Raw object access to the store under test, bypassing cloudckpt's format code."""

    def __init__(self, url: str, loop: LoopThread) -> None:
        self.base = StoragePath.from_url(url)
        self.loop = loop

    def path(self, rel: str) -> str:
        return (self.base / rel).path

    def get(self, rel: str) -> bytes | None:
        return self.loop.run(self.base.backend.get(self.path(rel)))

    def put(self, rel: str, data: bytes) -> None:
        self.loop.run(self.base.backend.put(self.path(rel), data))

    def delete(self, rel: str) -> None:
        self.loop.run(self.base.backend.delete(self.path(rel)))

    def listing(self, rel: str = "") -> dict[str, int]:
        location = self.base / rel if rel else self.base
        prefix = location.path.rstrip("/") + "/"

        async def run() -> dict[str, int]:
            return {
                info.path[len(prefix) :]: info.size
                async for info in location.backend.list_prefix(location.path)
            }

        return self.loop.run(run())

    def url(self, rel: str) -> str:
        return (self.base / rel).url


# ---------------------------------------------------------------------------- mutations
@dataclass
class Mutation:
    cls: str
    detail: str
    level: str  # exact | forged | swapped
    target: str  # the object changed (relative to the root)
    detectable: bool = False  # verify must report it
    writes: dict[str, bytes | None] = field(default_factory=dict)  # rel -> new bytes (None: delete)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        value = value[k]
    return value


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_STRINGS = [
    "../../../private/secret",
    "/etc/passwd",
    "..",
    "arrays/../../x",
    "packs/0.0/../../../x",
    "a/b",
    "",
    "\x00",
    "_COMMITTED",
    "²",
    "arrays/1",
    "packs/1.0",
    "packs/0.00",
    "float128",
    "object",
    "V8",
    "U4",
    "int4",
    "bfloat16",
    "str",
    "jax",
    "py",
    "zarr",
    "packed",
    "empty",
    "x" * 10000,
]
HOSTILE_NUMBERS = [
    0,
    -1,
    1,
    2,
    3,
    7,
    255,
    2**31,
    2**32 + 1,
    2**40,
    2**62,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    1.5,
    -0.0,
    1e308,
    True,
    False,
]


def _replacement(rng: random.Random, old: Any) -> tuple[str, Any]:
    """A hostile value to put where ``old`` was: (class, value)."""
    choice = rng.random()
    if choice < 0.2:
        return "json_wrong_type", rng.choice(
            [None, True, "s", 1, 1.5, [], {}, [None], {"a": 1}, [[0, 1]], "NaN"]
        )
    if choice < 0.45:
        if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.5:
            return "json_number", rng.choice(
                [old + 1, old - 1, old * 2, old // 2, -old, old + 4, old << 20, old * 1000]
            )
        return "json_number", rng.choice(HOSTILE_NUMBERS)
    if choice < 0.65:
        if isinstance(old, str) and rng.random() < 0.5:
            return "json_string", rng.choice(
                ["../" + old, "/" + old, old + "/..", old[:-1], old + "0", old.upper(), old * 2]
            )
        return "json_string", rng.choice(HOSTILE_STRINGS)
    if choice < 0.75:
        return "json_deep", _deep(rng.choice([20, 100, 600, 900]))
    if choice < 0.85 and isinstance(old, list) and old:
        changed = list(old)
        if rng.random() < 0.5:
            changed.append(copy.deepcopy(rng.choice(old)))
        else:
            del changed[rng.randrange(len(changed))]
        return "json_list_length", changed
    return "json_wrong_type", rng.choice([[old], {"x": old}, str(old)])


def _nan_envelope(payload: Any) -> bytes:
    """An envelope whose payload holds NaN/Infinity, checksummed as a careless writer would."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
    return b'{"crc32c":"%08x","data":%s}' % (google_crc32c.value(text), text)


def mutate_json(rng: random.Random, store: Store, step: int) -> Mutation:
    rel = f"{step}/{rng.choice(JSON_OBJECTS)}"
    payload = _jsonio.loads(store.get(f"ckpt/{rel}") or b"", where=rel)
    paths = list(_paths(payload))
    path = rng.choice(paths[1:] if len(paths) > 1 else paths)
    parent = _get(payload, path[:-1]) if path else None
    old = _get(payload, path)
    roll = rng.random()
    if path and roll < 0.12 and isinstance(parent, dict):
        del parent[path[-1]]
        cls, detail = "json_missing_key", f"del {path}"
    elif roll < 0.22 and isinstance(old, dict):
        key = rng.choice(
            ["extra", "format", "leaf", "none", "__proto__", "storage", "type", "x" * 300]
        )
        old[key] = rng.choice([1, "x", None, [], {"leaf": 0}])
        cls, detail = "json_extra_key", f"{path}[{key!r}] added"
    elif roll < 0.27:
        payload_text = _nan_envelope(
            _set(payload, path, rng.choice([math.nan, math.inf, -math.inf]))
        )
        return Mutation("json_nan", f"{path} = NaN/Inf", "exact", rel, True, {rel: payload_text})
    else:
        cls, value = _replacement(rng, old)
        payload = _set(payload, path, value)
        detail = f"{path} = {json.dumps(value)[:80]}"
    try:
        data = _jsonio.dumps(payload)
    except (ValueError, TypeError, RecursionError):
        data = _nan_envelope(payload)
    return Mutation(cls, detail, "forged", rel, False, {rel: data})


def _set(payload: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(payload, path[:-1])[path[-1]] = value
    return payload


def mutate_bytes(rng: random.Random, store: Store, step: int, objects: list[str]) -> Mutation:
    rel = f"{step}/{rng.choice(objects)}"
    data = store.get(f"ckpt/{rel}") or b""
    name = rel.split("/", 1)[1]
    # Bytes the format covers with a checksum or a size check; zarr.json, the claim and the
    # marker are not read for their content by a restore.
    covered = name not in ("_CLAIM", "_COMMITTED") and not name.endswith("zarr.json")
    roll = rng.random()
    if roll < 0.35 and data:
        i = rng.randrange(len(data))
        bit = 1 << rng.randrange(8)
        new = data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :]
        return Mutation("bit_flip", f"byte {i} ^ {bit}", "exact", rel, covered, {rel: new})
    if roll < 0.55:
        n = rng.choice([0, 1, len(data) // 2, max(len(data) - 1, 0), max(len(data) - 4, 0)])
        return Mutation(
            "truncate",
            f"to {n} of {len(data)}",
            "exact",
            rel,
            covered and n < len(data),
            {rel: data[:n]},
        )
    if roll < 0.7:
        extra = rng.choice([b"\0", b"\0" * 4, os.urandom(16), data[:64]])
        return Mutation(
            "extend", f"+{len(extra)} bytes", "exact", rel, covered, {rel: data + extra}
        )
    if roll < 0.85:
        detect = name not in ("_CLAIM",)
        return Mutation("delete", "deleted", "exact", rel, detect, {rel: None})
    other = f"{STEPS[0] if step != STEPS[0] else STEPS[1]}/{name}"
    donor = store.get(f"ckpt/{other}")
    if donor is None:
        return Mutation("delete", "deleted (no twin)", "exact", rel, True, {rel: None})
    return Mutation("swap_steps", f"replaced by {other}", "swapped", rel, False, {rel: donor})


def mutate_names(rng: random.Random, store: Store, step: int, objects: list[str]) -> Mutation:
    """A stray object under a hostile or misleading name inside the step."""
    name = rng.choice(
        [
            "state/arrays/0/c/9/9",
            "state/arrays/99/c/0",
            "state/packs/7.0",
            "state/packs/0.1",
            "x/..",
            "state/.hidden",
            "meta/extra.json",
            "00000001/_COMMITTED",
            "state/arrays/0/c/0/0/0",
        ]
    )
    rel = f"{step}/{name}"
    if name.rstrip("/").split("/", 1)[0] in ("x",):
        rel = f"{step}/x/evil"
    data = rng.choice([b"", b"\0" * 64, store.get(f"ckpt/{step}/{rng.choice(objects)}") or b""])
    return Mutation("stray_object", f"added {rel}", "exact", rel, False, {rel: data})
