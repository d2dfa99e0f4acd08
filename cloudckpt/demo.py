"""`make demo`: checkpoints committed atomically to local S3, GCS and a folder.

Starts the same local S3 (SeaweedFS) and GCS (fake-gcs-server) servers the
tests use, then for each backend writes a checkpoint through the atomicity
strategy the backend asks for, shows that an interrupted save is never
listed, cleans it up, and prints what is in each bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import atomicity
from cloudckpt import backends
from cloudckpt._servers import local_servers


async def _round(url: str) -> list[str]:
    backend, root = backends.resolve(url)
    strategy = backend.default_temporary_path_class()
    lines = [f"{url}  ({type(backend).__name__}, {strategy.__name__})"]
    for step in (100, 200):
        tmp = strategy.from_final(f"{root}/{step}", backend)
        where = await tmp.create()
        start = time.perf_counter()
        await backend.put(f"{where}/state/data", os.urandom(1 << 20))
        if step == 200:
            lines.append(f"  step {step}: crashed before its marker (simulated)")
            break
        await tmp.finalize()
        lines.append(f"  step {step}: committed in {time.perf_counter() - start:.3f}s")
    committed = [c.name for c in await atomicity.list_committed(backend, root)]
    uncommitted = [c.name for c in await atomicity.list_uncommitted(backend, root)]
    lines.append(f"  committed: {committed}  uncommitted: {uncommitted}")
    await atomicity.cleanup_uncommitted(backend, root, include_live=True)
    after = sorted({info.path[len(root) + 1 :] async for info in backend.list_prefix(root)})
    lines.append(f"  after clean-up: {after}")
    if committed != ["100"] or any(p.startswith("200") for p in after):
        raise SystemExit(f"demo check failed for {url}")
    for backend_ in backends.all_backends():
        await backend_.aclose()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="accepted for CI; the demo is short")
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, local_servers(buckets=("demo",)) as servers:
        os.environ.update(servers.env)
        print(servers.describe())
        for url in ("s3://demo/run", "gs://demo/run", os.path.join(folder, "run")):
            print("\n".join(asyncio.run(_round(url))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
