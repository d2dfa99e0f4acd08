"""Requests per save and per delete of the fenced commit protocol (issue 12).

Per backend, through a ``Checkpointer`` as a training job saves: a step of one
JSON item, and a step of a small pytree (two sharded arrays and a few small
leaves that are packed) with a JSON item beside it. Counted are cloudckpt's
own storage requests (``backend.stats``: the claim, the marker, listings,
the clock, the documents); the data objects (zarr arrays and packs, written
through tensorstore) are not requests of the protocol and are reported as
the step's data objects instead. ``protocol`` is what the commit protocol
adds: every request but the creates of the documents (which any writer of
the same step makes). On GCS a versioned read counts once here but
is two HTTP requests (metadata, then the bytes of that generation).

Before the protocol (198b6a8, issue 12's baseline) a save of one JSON item
on an object store made 7 requests (5 of them the protocol's: exists, claim,
list, claim re-read, marker) and a delete 5; the ``before`` column gives those
figures, measured then by tests/test_protocol_requests.py (memory, S3, GCS).
"""

from __future__ import annotations

import asyncio
from typing import Any

import jax
import numpy as np

import atomicity
import cloudckpt as cc
from benchmarks.common import Context, aligned, scenario
from cloudckpt.storage.path import StoragePath

#: issue 12's baseline (198b6a8): one JSON item.
BEFORE = {"json": {"save": 7, "protocol": 5, "delete": 5}}


def _pytree(ctx: Context) -> dict[str, Any]:
    sharding = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec(("data", "model")))
    arrays = {
        f"w{i}": jax.device_put(np.arange(1 << 18, dtype=np.float32) + i, sharding)
        for i in range(2)
    }
    small = {f"b{i}": np.full((16,), i, np.float32) for i in range(4)}
    return {**arrays, **small, "step": np.int64(7)}


def _count(url: str, args: Any) -> dict[str, Any]:
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:
        backend = ck.location(url).backend
        backend.stats.reset()
        ck.save(url, args=args)
        save = dict(backend.stats.calls)
    objects, delete = asyncio.run(_list_and_delete(StoragePath.from_url(url)))
    documents = [o for o in objects if atomicity.is_document(o)]
    return {
        "save": sum(save.values()),
        "save_by_op": save,
        "protocol": sum(save.values()) - len(documents),
        "documents": len(documents),
        "data_objects": sum(1 for o in objects if atomicity.attempt_of(o) is not None),
        "objects": len(objects),
        "delete": sum(delete.values()),
        "delete_by_op": delete,
    }


async def _list_and_delete(where: StoragePath) -> tuple[list[str], dict[str, int]]:
    """The step's objects (relative names), then the requests of deleting it."""
    backend = where.backend
    try:
        start = len(where.path) + 1
        objects = [i.path[start:] async for i in backend.list_prefix(where.path)]
        backend.stats.reset()
        await atomicity.delete_checkpoint(backend, where.path)
        return objects, dict(backend.stats.calls)
    finally:
        await backend.aclose()


@scenario("protocol", order=6)
def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"before": BEFORE, "backends": {}}
    tree = _pytree(ctx)
    cases = {
        "json": cc.args.Composite(meta=cc.args.JsonSave({"a": 1})),
        "pytree+json": cc.args.Composite(
            state=cc.args.StandardSave(tree), meta=cc.args.JsonSave({"a": 1})
        ),
    }
    for target in ctx.targets:
        rows = {name: _count(target.fresh(f"protocol-{name}"), a) for name, a in cases.items()}
        out["backends"][target.name] = rows
        ctx.log(f"protocol: {target.name}: {rows}")
    return out


def table_lines(result: dict[str, Any]) -> list[str]:
    """The summary rows for ``report.table``."""
    lines = [
        "\n== Protocol: cloudckpt's own requests per save and per delete "
        "(before: 198b6a8, issue 12's baseline) =="
    ]
    header = ["backend", "step", "save", "protocol", "before", "docs", "data objs", "delete",
              "before"]  # fmt: skip
    rows = []
    for name, cases in result["backends"].items():
        for case, r in cases.items():
            before = result["before"].get(case, {}) if name != "file" else {}
            rows.append(
                [name, case, str(r["save"]), str(r["protocol"]),
                 str(before.get("protocol", "-")), str(r["documents"]), str(r["data_objects"]),
                 str(r["delete"]), str(before.get("delete", "-"))]
            )  # fmt: skip
    lines += aligned(header, rows)
    lines.append(
        "save/delete: cloudckpt's storage calls (data objects, written through tensorstore, "
        "excluded); protocol: save minus the document creates; a GCS versioned read is 2 HTTP "
        "requests; file: the temporary directory and rename instead of claim and marker"
    )
    return lines
