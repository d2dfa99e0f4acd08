"""Hostile-checkpoint fuzzing: mutated real checkpoints never crash, hang or mislead a reader.

Each campaign runs in its own interpreter (tests/fuzz_worker.py), so that an
abort from C++ (tensorstore's ``std::bad_alloc``) or a hang is a reported
failure rather than a dead pytest. A campaign saves two steps through the
public API (zarr arrays with and without inner chunks, packed leaves, Python
and numpy scalars, a string, an empty array, a JSON item) and applies one
seeded mutation at a time:

* JSON payloads re-wrapped with a valid crc32c (so the mutation reaches the
  validation code): any field replaced by a wrong type, huge, negative or
  non-integral numbers, NaN/Infinity, deep nesting, ``..``/absolute/other-leaf
  names, missing and extra keys, lists grown or shrunk;
* objects bit-flipped, truncated, extended, deleted, or swapped with the
  same object of the other step; stray objects under misleading names.

After each, ``restore`` (without and with a target), ``metadata`` and
``cloudckpt ls/inspect/verify/cp`` must return the right data (see
fuzz_worker's ``Campaign._right``) or fail with an acceptable error:
CorruptCheckpointError or another builtin ValueError (atomicity's
ValidationError included), KeyError, TypeError, or an OSError such as
FileNotFoundError; the CLI must exit 0 or 1 without an ``internal error``.
A corruption that a checksum or size check covers must make ``verify`` and
``cp`` fail. Nothing from outside the checkpoint (a canary) may show up in
any result or output, nothing outside may change, and the address space may
not grow by more than 1 GiB (RLIMIT_AS; the checkpoint is ~14 KB). One
campaign also bounds each read's Python/numpy peak allocation (tracemalloc)
by 4x the step's stored bytes plus 48 MiB.

The default run is 1,000+ mutations in about a minute and a half on two
cores; ``CLOUDCKPT_FUZZ_MUTATIONS=N`` runs N (split over the campaigns). The
figures are printed (``-s`` shows them) for the closing note.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cloudckpt as cc

ROOT_PKG = Path(__file__).resolve().parents[1]


def _campaigns(total: int) -> list[list[str]]:
    """(backend, seed, count, extra flags): the memory backend is fastest, file is real disk."""
    memory = total * 55 // 100
    traced = max(total // 40, 20)
    return [
        ["--backend", "memory", "--seed", "1", "--count", str(memory)],
        ["--backend", "file", "--seed", "2", "--count", str(total - memory - traced)],
        ["--backend", "memory", "--seed", "3", "--count", str(traced), "--tracemalloc"],
    ]


def _run(campaigns: list[list[str]], workdir: Path) -> list[tuple[list[str], Any]]:
    path = os.pathsep.join([str(Path(cc.__file__).parents[1]), str(ROOT_PKG)])
    env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
    running: list[tuple[list[str], Path, Any, subprocess.Popen[bytes]]] = []
    try:
        return _collect(campaigns, workdir, env, running)
    finally:
        for *_, proc in running:  # interrupted (timeout, Ctrl-C): leave no campaign behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _collect(
    campaigns: list[list[str]],
    workdir: Path,
    env: dict[str, str],
    running: list[tuple[list[str], Path, Any, subprocess.Popen[bytes]]],
) -> list[tuple[list[str], Any]]:
    for n, flags in enumerate(campaigns):
        out = workdir / f"campaign-{n}.json"
        log = (workdir / f"campaign-{n}.log").open("w")
        argv = [sys.executable, "-m", "tests.fuzz_worker", *flags, "--out", str(out)]
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=str(ROOT_PKG))
        running.append((flags, out, log, proc))
    results = []
    for flags, out, log, proc in running:
        try:
            code = proc.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        tail = Path(log.name).read_text()[-3000:]
        if code != 0 or not out.exists():
            results.append((flags, {"crash": f"exit {code}", "log": tail}))
        else:
            results.append((flags, json.loads(out.read_text())))
    return results


def _figures(results: list[tuple[list[str], Any]]) -> str:
    by_class: collections.Counter[str] = collections.Counter()
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lines = []
    for flags, report in results:
        if "crash" in report:
            lines.append(f"campaign {' '.join(flags)}: CRASHED ({report['crash']})")
            continue
        by_class.update(report["by_class"])
        for op, counts in report["outcomes"].items():
            outcomes[op].update(counts)
        lines.append(
            f"campaign {report['backend']} seed {report['seed']}: {report['mutations']} mutations "
            f"in {report['seconds']} s, {len(report['failures'])} failures, peak traced "
            f"allocation {report['peak_alloc_bytes']} B (checkpoint {report['checkpoint_bytes']} B),"
            f" max RSS {report['max_rss_kib'] // 1024} MiB"
        )
    lines.append(
        f"mutations: {sum(n for c, n in by_class.items() if c != 'not_applicable')}; per class: {dict(sorted(by_class.items()))}"
    )
    for op, counts in outcomes.items():
        lines.append(f"  {op}: {dict(sorted(counts.items()))}")
    return "\n".join(lines)


TOTAL = int(os.environ.get("CLOUDCKPT_FUZZ_MUTATIONS", "1040"))


# About 0.1 s of CPU per mutation; a loaded two-core machine takes three times that.
@pytest.mark.timeout(max(900, TOTAL))
def test_hostile_checkpoint_fuzz_campaign(tmp_path: Path) -> None:
    total = TOTAL
    results = _run(_campaigns(total), tmp_path)
    figures = _figures(results)
    print("\n[fuzz] " + figures.replace("\n", "\n[fuzz] "))
    crashed = [(flags, r) for flags, r in results if "crash" in r]
    assert not crashed, f"a campaign crashed or hung: {crashed}"
    failures = [f for _, r in results for f in r["failures"]]
    shown = "\n".join(json.dumps(f)[:1500] for f in failures[:10])
    assert not failures, f"{len(failures)} failures:\n{shown}\n{figures}"
    assert sum(r["mutations"] for _, r in results) >= total * 0.97  # a few do not apply
    # Each class of mutation was exercised, and both outcomes happened.
    classes = collections.Counter()
    for _, r in results:
        classes.update(r["by_class"])
    assert {"bit_flip", "truncate", "extend", "delete", "swap_steps", "json_deep"} <= set(classes)
    restore = collections.Counter()
    for _, r in results:
        restore.update(r["outcomes"]["restore"])
    assert restore["ok"] > 0 and restore["error:CorruptCheckpointError"] > 0
