"""Stragglers: save and restore with 1 request in 50 held forever, against no stalls.

Issue 14's goal: with one request in 50 never answered, save and restore
still complete, within 2x their unstalled time. Each run is a fresh process
(``straggler_worker.py``; tensorstore reads its stall bound once per process)
talking to the server through a :class:`cloudckpt.testing.stallproxy.StallProxy`:
once with nothing held (the baseline, paying the same proxy hop) and once
holding the 25th of every 50 requests of each method forever. Reported per
backend and per deadline floor: median save and restore times and the
stalled/unstalled ratios. The floor is what a stalled write costs (its
transfer is cut after ``floor_s`` without progress, then retried); reads are
hedged after ``floor_s / 4``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import Context, median, ratio, scenario
from benchmarks.targets import BUCKET, remove

REPO = Path(__file__).resolve().parent.parent


def _one_in(n: int) -> Any:
    counts: dict[str, int] = {}

    def pick(method: str, path: str) -> bool:
        counts[method] = counts.get(method, 0) + 1
        return counts[method] % n == n // 2

    return pick


def _run(ctx: Context, kind: str, upstream: str, floor_s: float, stall: bool) -> dict[str, Any]:
    from cloudckpt.storage.redact import redact
    from cloudckpt.testing.stallproxy import StallProxy

    scheme = "s3" if kind == "s3" else "gs"
    url = f"{scheme}://{BUCKET}/stragglers-{uuid.uuid4().hex[:8]}"
    picker = _one_in(50) if stall else (lambda method, path: False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORSTORE_CURL_")}
    spec = {"url": url, "size_mib": ctx.config.straggler_size_mib, "floor_s": floor_s}
    spec["reps"] = ctx.config.reps
    with StallProxy(upstream, flavor=kind, stall=picker) as proxy:
        if kind == "s3":
            env["AWS_ENDPOINT_URL"] = proxy.endpoint
            env.pop("AWS_ENDPOINT_URL_S3", None)
        else:
            env["STORAGE_EMULATOR_HOST"] = proxy.endpoint
            env["TENSORSTORE_GCS_HTTP_URL"] = proxy.endpoint
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.straggler_worker", json.dumps(spec)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        held = len(proxy.stats.stalled)
        held_requests = [f"{method} {redact(path)}" for method, path in proxy.stats.stalled]
        requests = proxy.stats.requests
    remove(url)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"straggler worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result.update(stalled=held, requests=requests, held_requests=held_requests)
    ctx.log(
        f"stragglers {kind} floor {floor_s:g}s {'stalled' if stall else 'unstalled'}: "
        f"save {result['save_s']} restore {result['restore_s']} held {held}/{requests}"
    )
    return result


@scenario("stragglers", order=60)
def stragglers(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"size_mib": ctx.config.straggler_size_mib, "backends": {}}
    servers = ctx.servers
    if servers is None:
        return out
    for kind in ("s3", "gcs"):
        if ctx.target(kind) is None:
            continue
        upstream = servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint
        rows = {}
        for floor_s in ctx.config.straggler_floors_s:
            base = _run(ctx, kind, upstream, floor_s, stall=False)
            held = _run(ctx, kind, upstream, floor_s, stall=True)
            rows[f"{floor_s:g}"] = {
                "unstalled": base,
                "stalled": held,
                "save_ratio": ratio(median(held["save_s"]), median(base["save_s"])),
                "restore_ratio": ratio(median(held["restore_s"]), median(base["restore_s"])),
                "equal": bool(base["equal"] and held["equal"]),
            }
        out["backends"][kind] = rows
    return out
