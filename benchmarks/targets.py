"""Where the benchmarks write: one target per backend, with its raw channel and peer.

A target knows the cloudckpt URL root for its backend, how to run the raw
channel against the same server, where the Orbax peer writes (None where
Orbax has no path, i.e. S3), and how to list and remove what a save left.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import raw

BUCKET = "cloudckpt-bench"


@dataclass(frozen=True)
class ObjectStat:
    path: str
    size: int


@dataclass(frozen=True)
class Target:
    """One backend under test."""

    name: str
    root: str  # cloudckpt URL root: a directory, s3://bucket/prefix or gs://bucket/prefix
    orbax_root: str | None
    raw_put_get: Callable[..., raw.RawResult]  # (sub-prefix, payloads, keep=False on stores)
    endpoint: str | None = None  # the object store's endpoint (None for the file system)

    def fresh(self, what: str) -> str:
        """A unique URL under the root for one save."""
        return f"{self.root}/{what}-{uuid.uuid4().hex[:8]}"

    def fresh_orbax(self, what: str) -> str:
        assert self.orbax_root is not None
        return f"{self.orbax_root}/{what}-{uuid.uuid4().hex[:8]}"

    @property
    def is_file(self) -> bool:
        return "://" not in self.root


def list_objects(url: str) -> list[ObjectStat]:
    """Every object (file) under ``url``, through cloudckpt's own backend listing."""
    if "://" not in url:
        out = []
        for dirpath, _dirs, files in os.walk(url):
            for name in files:
                full = os.path.join(dirpath, name)
                out.append(ObjectStat(full, os.path.getsize(full)))
        return out
    return asyncio.run(_list(url))


async def _list(url: str) -> list[ObjectStat]:
    import cloudckpt as cc

    backend, path = cc.backends.resolve(url)
    try:
        return [ObjectStat(info.path, info.size) async for info in backend.list_prefix(path)]
    finally:
        await backend.aclose()


def remove(url: str) -> None:
    """Deletes everything under ``url`` (untimed clean-up between repetitions)."""
    if "://" not in url:
        shutil.rmtree(url, ignore_errors=True)
        return
    asyncio.run(_remove(url))


async def _remove(url: str) -> None:
    import cloudckpt as cc

    backend, path = cc.backends.resolve(url)
    try:
        await backend.delete_prefix(path)
    finally:
        await backend.aclose()


def make_targets(names: Sequence[str], workdir: str, servers: Any | None) -> list[Target]:
    """Targets for ``names`` (``file``, ``s3``, ``gcs``); object stores need ``servers``."""
    out = []
    for name in names:
        if name == "file":
            root = os.path.join(workdir, "file")
            out.append(
                Target(
                    "file",
                    root,
                    os.path.join(workdir, "orbax"),
                    lambda sub, data, _r=root: raw.file_put_get(os.path.join(_r, sub), data),
                )
            )
        elif name == "s3":
            endpoint = servers.s3.endpoint
            out.append(
                Target(
                    "s3",
                    f"s3://{BUCKET}/cc",
                    None,
                    lambda sub, data, _e=endpoint, **kw: raw.s3_put_get(
                        _e, BUCKET, f"raw/{sub}", data, **kw
                    ),
                    endpoint,
                )
            )
        elif name == "gcs":
            endpoint = servers.gcs.endpoint
            out.append(
                Target(
                    "gcs",
                    f"gs://{BUCKET}/cc",
                    f"gs://{BUCKET}/orbax",
                    lambda sub, data, _e=endpoint, **kw: raw.gcs_put_get(
                        _e, BUCKET, f"raw/{sub}", data, **kw
                    ),
                    endpoint,
                )
            )
        else:
            raise ValueError(f"unknown backend {name!r}; choose from file, s3, gcs")
    return out
