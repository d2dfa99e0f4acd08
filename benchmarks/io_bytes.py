"""Data bytes written and read per process, on 1x8, 2x4 and 4x2, with the pod-scale options on and off.

Issue 14: with data parallelism one host used to write every replicated byte
and every host read all of them. This scenario starts three worker groups
(``benchmarks/mp_bench_worker.py``, driven as in ``multiprocess.py``): one
process with 8 CPU devices, two with 4 and four with 2, all on the same
global 4x2 ``("data", "model")`` mesh and the same ``--io-bytes-size-mib``
tree (the main tree's shapes and shardings: its ``head``, ``norm`` and bias
leaves, about 15% of its bytes, are replicated over the data axis, and so
over the processes; the rest is sharded). Per backend, each group saves and
restores the tree (onto the saved shardings) twice: with ``replica_parallel``
(save) and ``share_reads`` (restore) on, the defaults, and with both off. Each
process talks to the servers through a byte-counting proxy of its own
(``cloudckpt.testing.faultproxy.ByteCountingProxy``), so every channel is
counted: tensorstore's, the S3 direct writes and the direct chunk reads. It
reports the body bytes of its requests and answers for data objects (array
chunks and packs; ``zarr.json``, ``pytree.json`` and the other documents are
not counted), and checks a few restored values per shard.

The figures: ``max/mean`` of the bytes per process (1.0: every process moves
an equal share) and ``total/tree`` (1.0: each byte crosses the bucket once).
Untimed beyond the save and restore times it records; about a minute per
backend at the default 32 MiB, most of it starting the seven processes.
"""

from __future__ import annotations

import math
import time
from typing import Any

from benchmarks.common import Context, ratio, scenario
from benchmarks.multiprocess import BYTES_TOPOLOGIES, Group, _run_timeout, check_verified
from benchmarks.targets import Target, remove

#: (row label, replica_parallel, share_reads)
OPTIONS: tuple[tuple[str, bool, bool], ...] = (("on", True, True), ("off", False, False))


def bytes_per_process(
    ctx: Context, groups: dict[str, Group], target: Target, size_mib: float
) -> dict[str, Any]:
    """Data bytes each process writes and reads for one save and restore, per topology and option."""
    out: dict[str, Any] = {}
    for name, group in groups.items():
        tree_bytes = group.ready[0]["bytes"]
        for label, replica_parallel, share_reads in OPTIONS:
            url = target.fresh(f"io-bytes-{name}")
            try:
                answers = group.command(
                    "bytes",
                    _run_timeout(size_mib),
                    url=url,
                    replica_parallel=replica_parallel,
                    share_reads=share_reads,
                )
            finally:
                remove(url)
            check_verified(answers, f"{name} on {target.name}")
            row: dict[str, Any] = {
                "replica_parallel": replica_parallel,
                "share_reads": share_reads,
                "save_s": max(a["save_s"] for a in answers),
                "restore_s": max(a["restore_s"] for a in answers),
            }
            for which in ("bytes_written", "bytes_read"):
                table = [a[which] for a in answers]
                mean = sum(table) / len(table)
                row[which] = {
                    "per_process": table,
                    "max_over_mean": ratio(max(table), mean) if mean else None,
                    "total_over_tree": ratio(sum(table), tree_bytes),
                }
            out[f"{name} options={label}"] = row
            ctx.log(
                f"io_bytes {target.name} {name} options={label}: written "
                f"{[round(b / 2**20, 1) for b in row['bytes_written']['per_process']]} MiB, read "
                f"{[round(b / 2**20, 1) for b in row['bytes_read']['per_process']]} MiB"
            )
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The bytes-per-process tables of :func:`io_bytes`'s result, as text lines."""
    tree = result.get("tree_bytes", 0) / 2**20
    lines = [
        f"\n== Data bytes per process ({tree:.0f} MiB tree; MiB; max/mean; total/tree), "
        "options on = replica_parallel + share_reads (defaults), off = both off =="
    ]
    for backend, rows in result.get("backends", {}).items():
        for row, r in rows.items():
            for which, word in (("bytes_written", "written"), ("bytes_read", "read")):
                b = r[which]
                mib = ", ".join(f"{x / 2**20:.1f}" for x in b["per_process"])
                lines.append(
                    f"{backend:6} {row:16} {word:7} [{mib}]  max/mean "
                    f"{_fmt(b['max_over_mean'])}  total/tree {_fmt(b['total_over_tree'])}"
                )
    return lines


@scenario("io_bytes", order=55)
def io_bytes(ctx: Context) -> dict[str, Any]:
    size_mib = ctx.config.io_bytes_size_mib
    groups: dict[str, Group] = {}
    out: dict[str, Any] = {"size_mib": size_mib, "topologies": {}, "backends": {}}
    try:
        start = time.monotonic()
        for name, processes, devices in BYTES_TOPOLOGIES:  # start together: start-up overlaps
            groups[name] = Group(name, processes, devices, size_mib, count_bytes=True)
        for name, group in groups.items():
            ready = group.wait_ready()
            out["topologies"][name] = {
                "processes": group.processes,
                "devices_per_process": group.devices,
                "replica0_bytes_per_process": [r["replica0_bytes_here"] for r in ready],
            }
        out["tree_bytes"] = groups["1x8"].ready[0]["bytes"]
        out["startup_s"] = round(time.monotonic() - start, 1)
        ctx.log(f"io_bytes: groups {', '.join(groups)} ready in {out['startup_s']:.0f}s")
        for target in ctx.targets:
            out["backends"][target.name] = bytes_per_process(ctx, groups, target, size_mib)
        for line in table_lines(out):
            ctx.log(line)
    finally:
        for group in groups.values():
            group.stop()
    return out
