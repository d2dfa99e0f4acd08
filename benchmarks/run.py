"""``make bench``: cloudckpt against the raw channel and Orbax, on real local servers.

Starts SeaweedFS (S3) and fake-gcs-server (GCS) as the tests do, builds a
sharded pytree on 8 CPU devices, runs the selected scenarios and writes
``benchmarks/results/latest.json`` and ``latest.png``, then prints a summary.

    python -m benchmarks.run                 # the default run (a few minutes)
    python -m benchmarks.run --quick         # a tiny smoke run (CI)
    python -m benchmarks.run --size-mib 1024 --reps 5 --backends file,s3
    python -m benchmarks.run --scenarios throughput,blocking
    python -m benchmarks.run --scenarios restore_phases --phases-size-mib 4096
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# Before jax initialises its backends: the benchmarks use an 8-device CPU mesh.
import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from benchmarks import (  # noqa: E402  (registers the scenarios)
    blocking,
    capped,
    io_bytes,
    latency,
    listing,
    memory,
    multiprocess,
    phases,
    protocol,
    report,
    scale_model,
    scaling,
    stragglers,
    throughput,
)
from benchmarks.common import Config, Context, scenarios  # noqa: E402
from benchmarks.ops import point_orbax_at_gcs  # noqa: E402
from benchmarks.targets import BUCKET, make_targets  # noqa: E402
from benchmarks.tree import make_mesh  # noqa: E402

_ = (
    blocking,
    capped,
    io_bytes,
    latency,
    listing,
    memory,
    multiprocess,
    phases,
    protocol,
    scale_model,
    scaling,
    stragglers,
    throughput,
)
SCENARIOS = scenarios()
RESULTS = Path(__file__).resolve().parent / "results"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    defaults = Config()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke test")
    p.add_argument("--size-mib", type=float, help=f"main tree size (default {defaults.size_mib:g})")
    p.add_argument(
        "--reps", type=int, help=f"repetitions per measurement (default {defaults.reps})"
    )
    p.add_argument("--backends", help="comma-separated subset of file,s3,gcs (default all)")
    p.add_argument("--no-peer", action="store_true", help="skip the Orbax peer")
    p.add_argument(
        "--engine-all",
        action="store_true",
        help="run the plain-tensorstore reference on S3 and GCS too (default: file only)",
    )
    p.add_argument("--scale-sizes-mib", help="tree sizes of the size scaling, comma-separated")
    p.add_argument("--scale-reps", type=int, help="repetitions per size-scaling point (default 1)")
    p.add_argument(
        "--small-reps",
        type=int,
        help="repetitions of the sub-second scaling saves: leaves, goal, shapes (default 3)",
    )
    p.add_argument("--leaf-counts", help="leaf counts of the leaf scaling, comma-separated")
    p.add_argument("--leaves-total-mib", type=float, help="total bytes of the leaf scaling trees")
    p.add_argument("--goal-leaves", type=int, help="leaves of the many-small-leaves goal tree")
    p.add_argument(
        "--orbax-many-leaves",
        action="store_true",
        help="also time Orbax on the many-leaves goal tree (about a minute at 10,000 leaves)",
    )
    p.add_argument("--memory-reps", type=int, help="fresh processes per memory measurement")
    p.add_argument(
        "--mp-size-mib",
        type=float,
        help=f"tree size of the 2-process vs 1-process scenario (default {defaults.mp_size_mib:g})",
    )
    p.add_argument(
        "--mp-reps",
        type=int,
        help=f"repetitions of the 2-process vs 1-process scenario (default {defaults.mp_reps})",
    )
    p.add_argument(
        "--listing-objects",
        type=int,
        help=f"objects per step of the listing scenario (default {defaults.listing_objects})",
    )
    p.add_argument(
        "--phases-size-mib",
        type=float,
        help="tree size of the restore_phases scenario (default "
        f"{defaults.phases_size_mib:g}; 4096 for the issue's large form, about 12 GiB of RAM with Orbax)",
    )
    p.add_argument(
        "--phases-reps",
        type=int,
        help=f"repetitions of the restore_phases scenario (default {defaults.phases_reps})",
    )
    p.add_argument(
        "--file-cache",
        choices=("warm", "cold"),
        help="page-cache state of file reads in restore_phases, the same for the restore and "
        "np.fromfile: warm (both read once, untimed, first) or cold (both evicted with "
        "posix_fadvise DONTNEED first); default warm",
    )
    p.add_argument(
        "--io-bytes-size-mib",
        type=float,
        help=f"tree size of the bytes-per-process scenario (default {defaults.io_bytes_size_mib:g})",
    )
    p.add_argument(
        "--capped-size-mib",
        type=float,
        help=f"array size of the capped_streams scenario (default {defaults.capped_size_mib:g})",
    )
    p.add_argument(
        "--capped-rate-mbs",
        type=float,
        help="MB/s each connection may download in the capped_streams scenario "
        f"(default {defaults.capped_rate_mbs:g})",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        help=f"restore_latency: ms every answer is held back (default {defaults.latency_ms:g})",
    )
    p.add_argument(
        "--capped-reps",
        type=int,
        help=f"repetitions of the capped_streams scenario (default {defaults.capped_reps})",
    )
    p.add_argument(
        "--straggler-floors",
        help="Deadlines.floor_s values of the stragglers scenario, comma-separated "
        "(default 2,20; 20 is the library's default)",
    )
    p.add_argument(
        "--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)} (default all)"
    )
    p.add_argument("--workdir", help="where file-backend checkpoints go (default: a temp dir)")
    p.add_argument("--output", default=str(RESULTS / "latest.json"), help="the JSON result")
    p.add_argument("--plot", default=str(RESULTS / "latest.png"), help="the PNG plot")
    args = p.parse_args(argv)

    cfg = Config()
    if args.quick:
        cfg = Config(
            size_mib=16,
            reps=1,
            scale_sizes_mib=[8, 32],
            scale_reps=1,
            small_reps=1,
            leaf_counts=[10, 1000],
            goal_leaves=1000,
            mp_size_mib=16,
            mp_reps=1,
            io_bytes_size_mib=8,
            straggler_size_mib=8,
            straggler_floors_s=[2.0],
            listing_objects=1000,
            phases_size_mib=16,
            phases_reps=1,
            capped_size_mib=32,
            capped_reps=1,
            quick=True,
        )
    if args.size_mib is not None:
        cfg.size_mib = args.size_mib
    if args.reps is not None:
        cfg.reps = args.reps
    if args.backends:
        cfg.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    cfg.peer = not args.no_peer
    cfg.engine_all = args.engine_all
    if args.scale_sizes_mib:
        cfg.scale_sizes_mib = _floats(args.scale_sizes_mib)
    if args.scale_reps is not None:
        cfg.scale_reps = args.scale_reps
    if args.small_reps is not None:
        cfg.small_reps = args.small_reps
    cfg.orbax_many_leaves = args.orbax_many_leaves
    if args.leaf_counts:
        cfg.leaf_counts = _ints(args.leaf_counts)
    if args.leaves_total_mib is not None:
        cfg.leaves_total_mib = args.leaves_total_mib
    if args.goal_leaves is not None:
        cfg.goal_leaves = args.goal_leaves
    if args.memory_reps is not None:
        cfg.memory_reps = args.memory_reps
    if args.mp_size_mib is not None:
        cfg.mp_size_mib = args.mp_size_mib
    if args.mp_reps is not None:
        cfg.mp_reps = args.mp_reps
    if args.phases_size_mib is not None:
        cfg.phases_size_mib = args.phases_size_mib
    if args.phases_reps is not None:
        cfg.phases_reps = args.phases_reps
    if args.file_cache is not None:
        cfg.file_cache = args.file_cache
    if args.listing_objects is not None:
        cfg.listing_objects = args.listing_objects
    if args.io_bytes_size_mib is not None:
        cfg.io_bytes_size_mib = args.io_bytes_size_mib
    if args.capped_size_mib is not None:
        cfg.capped_size_mib = args.capped_size_mib
    if args.capped_rate_mbs is not None:
        cfg.capped_rate_mbs = args.capped_rate_mbs
    if args.latency_ms is not None:
        cfg.latency_ms = args.latency_ms
    if args.capped_reps is not None:
        cfg.capped_reps = args.capped_reps
    if args.straggler_floors:
        cfg.straggler_floors_s = _floats(args.straggler_floors)
    wanted = (
        [s.strip() for s in args.scenarios.split(",") if s.strip()]
        if args.scenarios
        else list(SCENARIOS)
    )
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    cfg.scenarios = [s for s in SCENARIOS if s in wanted]  # always in running order
    bad = [b for b in cfg.backends if b not in ("file", "s3", "gcs")]
    if bad or not cfg.backends:
        p.error(f"--backends takes a subset of file,s3,gcs, got {args.backends!r}")
    if (
        min(
            cfg.reps,
            cfg.scale_reps,
            cfg.small_reps,
            cfg.memory_reps,
            cfg.mp_reps,
            cfg.phases_reps,
            cfg.capped_reps,
        )
        < 1
    ):
        p.error("repetitions must be at least 1")
    return cfg, args


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(servers: Any | None) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        **{
            dist: _version(dist)
            for dist in ("cloudckpt", "jax", "tensorstore", "orbax-checkpoint", "numpy")
        },
        **{dist: _version(dist) for dist in ("aiobotocore", "gcsfs", "s3fs", "aiohttp")},
    }
    if servers is not None:
        env["servers"] = servers.describe()
    return env


def machine_load() -> dict[str, Any]:
    """Load average and CPU pressure: how much else the (shared) machine was doing."""
    out: dict[str, Any] = {"loadavg": os.getloadavg()}
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        out["cpu_pressure_some"] = {k: float(v) for k, v in (x.split("=") for x in some[1:4])}
    except OSError:
        pass
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="cloudckpt-bench-")
        )
        cfg.workdir = workdir
        servers = None
        if any(b in ("s3", "gcs") for b in cfg.backends):
            from cloudckpt.testing.servers import local_servers

            server_dir = Path(workdir) / "servers"
            server_dir.mkdir(parents=True, exist_ok=True)
            servers = stack.enter_context(local_servers(buckets=(BUCKET,), workdir=server_dir))
            os.environ.update(servers.env)
            point_orbax_at_gcs(servers.gcs.endpoint)
        load_before = machine_load()
        ctx = Context(cfg, make_targets(cfg.backends, workdir, servers), servers, make_mesh())
        ctx.log(
            f"devices: {len(jax.devices())}; " + (servers.describe() if servers else "no servers")
        )
        results: dict[str, Any] = {}
        timings: dict[str, float] = {}
        for name in cfg.scenarios:
            t0 = time.monotonic()
            results[name] = SCENARIOS[name](ctx)
            timings[name] = round(time.monotonic() - t0, 1)
            ctx.log(f"scenario {name} done in {timings[name]:.0f}s")
        document = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {k: v for k, v in vars(cfg).items() if k != "workdir"},
            "environment": environment(servers),
            "machine_load": {"before": load_before, "after": machine_load()},
            "results": results,
            "scenario_seconds": timings,
            "total_seconds": round(time.monotonic() - started, 1),
        }
        document["summary"] = report.summary(document)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(_clean(document), indent=2) + "\n")
    plot = report.plot(document, Path(args.plot))
    print(report.table(document))
    print(f"\nwrote {output}" + (f" and {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
