"""The engine reference: plain tensorstore writing and reading the same zarr arrays.

cloudckpt hands array bytes to tensorstore. To tell cloudckpt's own overhead
from the engine's (zarr encoding, crc32c, the HTTP or file driver), this
writes the arrays of a cloudckpt checkpoint again with nothing but
tensorstore: same zarr v3 metadata (read from the checkpoint's
``pytree.json``, see docs/FORMAT.md), same kvstore spec and tensorstore
context as the cloudckpt backend, whole host arrays in one write each, then
reads them back as numpy arrays. Packed small leaves are left out (they are a
few hundred KiB).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tensorstore as ts

ITEM = "state"


def host_arrays(state: Any) -> dict[str, np.ndarray]:
    """Every jax.Array leaf of ``state`` on the host, by its key path (as cloudckpt names it)."""
    pairs, _ = jax.tree_util.tree_flatten_with_path(state)
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in pairs
        if isinstance(leaf, jax.Array)
    }


def zarr_layout(url: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(leaf path, array key, zarr metadata) of each zarr array in the checkpoint at ``url``."""

    async def read() -> bytes | None:
        import cloudckpt as cc

        backend, path = cc.backends.resolve(url)
        try:
            return await backend.get(f"{path}/{ITEM}/pytree.json")
        finally:
            await backend.aclose()

    data = asyncio.run(read())
    if data is None:
        raise FileNotFoundError(f"{url}/{ITEM}/pytree.json is missing; has the format changed?")
    document = json.loads(data)
    document = document.get("data", document)  # the checksummed envelope, where present
    leaves = document["leaves"]
    return [
        (leaf["path"], leaf["storage"]["key"], leaf["storage"]["metadata"])
        for leaf in leaves
        if leaf.get("storage", {}).get("type") == "zarr"
    ]


def _specs(url: str) -> Callable[[str], tuple[dict[str, Any], ts.Context]]:
    """The kvstore spec of each key under ``url``, all with one tensorstore context."""
    import cloudckpt as cc

    backend, path = cc.backends.resolve(url)
    context = backend.tensorstore_context()
    return lambda key: (backend.kvstore_spec(f"{path}/{key}"), context)


async def _write(url: str, layout: list[tuple[str, str, dict[str, Any]]], host: dict) -> None:
    spec_of = _specs(url)

    async def one(leaf: str, key: str, metadata: dict[str, Any]) -> None:
        kvstore, context = spec_of(key)
        spec = {"driver": "zarr3", "kvstore": kvstore, "metadata": metadata, "create": True}
        store = await ts.open(spec, context=context)
        await store.write(host[leaf], can_reference_source_data_indefinitely=True)

    await asyncio.gather(*(one(*entry) for entry in layout))


async def _read(url: str, layout: list[tuple[str, str, dict[str, Any]]]) -> int:
    spec_of = _specs(url)

    async def one(key: str, metadata: dict[str, Any]) -> int:
        kvstore, context = spec_of(key)
        spec = {"driver": "zarr3", "kvstore": kvstore, "metadata": metadata, "open": True}
        store = await ts.open(spec, context=context)
        return (await store.read()).nbytes

    return sum(await asyncio.gather(*(one(key, meta) for _, key, meta in layout)))


def write_read(
    url: str, layout: list[tuple[str, str, dict[str, Any]]], host: dict
) -> tuple[float, float]:
    """Seconds to write every array under ``url``, then to read them all back."""
    start = time.perf_counter()
    asyncio.run(_write(url, layout, host))
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    got = asyncio.run(_read(url, layout))
    read_s = time.perf_counter() - start
    expected = sum(host[leaf].nbytes for leaf, _, _ in layout)
    if got != expected:
        raise RuntimeError(f"engine reference read {got} bytes back, wrote {expected}")
    return write_s, read_s
