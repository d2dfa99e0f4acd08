"""Peak resident memory of a saving process, above its baseline, in a fresh process per save.

The parent runs ``python -m benchmarks.memory`` once per backend (and for
Orbax on the file backend). The child builds the same tree, saves a tiny tree
once to the same backend (so imports and client start-up are in the
baseline, not in the figure), collects garbage, resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``), saves the tree with a blocking
checkpointer, and reports ``VmHWM - baseline``. A thread sampling ``VmRSS``
every 2 ms cross-checks the figure where the reset is not allowed.

The result is a multiple of the checkpoint's logical bytes: 1.0 means the
save held one extra copy of the data at its peak (the device-to-host copy,
which on CPU devices is a real memcpy).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any

from benchmarks.common import Context, median, ratio, scenario

_KIB = 1024


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * _KIB if match else 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _status("VmRSS"))
            time.sleep(0.002)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _status("VmRSS"))


def child(url: str, size_mib: float, saver_name: str) -> dict[str, Any]:
    """Runs in the fresh process: build, warm up, reset the peak, save, report."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_platforms", "cpu")
    from benchmarks import ops, tree

    saver: ops.Saver = ops.CloudCkpt() if saver_name == "cloudckpt" else ops.Orbax()
    rss_start = _status("VmRSS")
    mesh = tree.make_mesh()
    state = tree.model_tree(size_mib, mesh)
    nbytes = tree.tree_nbytes(state)
    rss_tree = _status("VmRSS")
    saver.save(url + "-warmup", tree.model_tree(1, mesh))
    gc.collect()
    baseline = _status("VmRSS")
    reset = _reset_peak()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    saver.save(url, state)
    save_s = time.perf_counter() - start
    sampled = sampler.stop()
    hwm = _status("VmHWM") if reset else 0
    peak = max(hwm, sampled)
    saver.close()
    return {
        "saver": saver_name,
        "bytes": nbytes,
        "rss_start": rss_start,
        "rss_after_tree": rss_tree,
        "baseline": baseline,
        "peak": peak,
        "peak_method": "VmHWM after clear_refs, and VmRSS sampled every 2 ms"
        if reset
        else "VmRSS sampled every 2 ms",
        "above_baseline": peak - baseline,
        "multiple": ratio(peak - baseline, nbytes),
        "save_s": save_s,
    }


def measure(url: str, size_mib: float, saver: str) -> dict[str, Any]:
    """Runs :func:`child` in a fresh interpreter with this process's environment."""
    cmd = [sys.executable, "-m", "benchmarks.memory", url, str(size_mib), saver]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory probe {' '.join(cmd[2:])} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


@scenario("memory", order=20)
def memory(ctx: Context) -> dict[str, Any]:
    from benchmarks.targets import remove

    cfg = ctx.config
    runs: list[tuple[str, str, str]] = [(t.name, "cloudckpt", t.fresh("mem")) for t in ctx.targets]
    file_target = ctx.target("file")
    if cfg.peer and file_target is not None:
        runs.append(("file", "orbax", file_target.fresh_orbax("mem")))
    out: dict[str, Any] = {}
    for backend, saver, url in runs:
        probes = []
        for _ in range(cfg.memory_reps):
            probes.append(measure(url, cfg.size_mib, saver))
            remove(url)
            remove(url + "-warmup")
        multiple = median([p["multiple"] for p in probes])
        key = backend if saver == "cloudckpt" else f"{backend}_orbax"
        out[key] = {"multiple": multiple, "probes": probes}
        ctx.log(
            f"memory {saver} on {backend}: peak {probes[-1]['above_baseline'] / 2**20:.0f} MiB "
            f"above baseline = {multiple:.2f}x the checkpoint's bytes"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="one memory probe (run by benchmarks.memory)")
    parser.add_argument("url")
    parser.add_argument("size_mib", type=float)
    parser.add_argument("saver", choices=("cloudckpt", "orbax"))
    args = parser.parse_args()
    print(json.dumps(child(args.url, args.size_mib, args.saver)), flush=True)


if __name__ == "__main__":
    main()
