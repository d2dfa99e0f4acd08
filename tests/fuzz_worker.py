"""One hostile-checkpoint fuzz campaign, run in its own interpreter by test_fuzz_checkpoints.

``python -m tests.fuzz_worker --backend file --seed 1 --count 500 --out result.json``

Saves real checkpoints through the public API (two steps of a tree with zarr
arrays, packed leaves, scalars, strings and a JSON item), then applies one
mutation at a time, runs every read path on the mutated checkpoint, checks
the outcome and undoes the mutation. The outcome of each read must be the
right data or an acceptable error (:data:`ACCEPTABLE`); anything else —
another exception type, an ``internal error`` from the CLI, wrong data, a
canary from outside the checkpoint in any output, a change outside the
checkpoint, a peak allocation beyond the bound — is recorded as a failure
with the mutation that caused it, so it can be replayed and kept as a
regression case. A hang is cut by faulthandler (the mutation in flight is on
stderr); an abort kills this process, which the parent reports.

What counts as "the right data" depends on what the mutation can change
without breaking a checksum (see ``Campaign._right``):

* ``exact``: bytes changed, truncated, extended or deleted; a JSON envelope
  edited without its checksum. A read that succeeds returns exactly what was
  saved.
* ``forged``: a JSON payload rewritten with a valid checksum, as a writer
  could. Free content (strings, dict keys, metrics, a JSON item's value) may
  differ; every array must still have the saved shape and bytes, in order.
* ``swapped``: an object replaced by the same object of the other step
  (checksums still pass): every array element is the saved one or the other
  step's.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import os
import random
import resource
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.format import jsonio as _jsonio

from .fuzz_mutations import STEPS, Mutation, Store, mutate_bytes, mutate_json, mutate_names
from .hostile import manager, run_cli, save_steps, state

#: Errors a read of a hostile checkpoint may raise: clear, builtin, catchable.
#: CorruptCheckpointError is a ValueError. FileNotFoundError (an object the
#: metadata names is gone) and PermissionError are OSErrors; KeyError and
#: TypeError are raised for wrong restore args / item lookups.
ACCEPTABLE = (ValueError, KeyError, FileNotFoundError, TypeError, OSError)
CANARY = "CANARY-b9f1"
#: Peak Python/numpy allocation allowed for one read, beyond 4x the step's stored bytes.
ALLOC_SLACK = 48 << 20


# ------------------------------------------------------------------------------ checking
def _flat(value: Any) -> list[Any]:
    """Leaves in stored order (dict insertion order, not jax's sorted order)."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def _skeleton(value: Any) -> Any:
    if isinstance(value, dict):
        return ("dict", [_skeleton(v) for v in value.values()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_skeleton(v) for v in value])
    return "leaf"


def _array(x: Any) -> np.ndarray | None:
    if isinstance(x, str) or x is None:
        return None
    return np.asarray(x)


def same_exact(a: Any, b: Any) -> bool:
    if isinstance(a, jax.Array) or isinstance(b, jax.Array):
        if not (isinstance(a, jax.Array) and isinstance(b, jax.Array)) or a.sharding != b.sharding:
            return False
        a, b = np.asarray(a), np.asarray(b)
    if type(a) is not type(b) and not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_exact(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_exact(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (np.ndarray, np.generic)):
        x, y = np.asarray(a), np.asarray(b)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    if isinstance(a, cc.ArrayMetadata):
        return (a.shape, a.dtype, a.kind, a.sharding) == (b.shape, b.dtype, b.kind, b.sharding)
    return a == b


def same_arrays(a: Any, b: Any) -> bool:
    """Same structure and, leaf by leaf, the same array shapes and bytes; strings are free."""
    if _skeleton(a) != _skeleton(b):
        return False
    for x, y in zip(_flat(a), _flat(b), strict=True):
        if isinstance(x, cc.ArrayMetadata) or isinstance(y, cc.ArrayMetadata):
            if not (isinstance(x, cc.ArrayMetadata) and isinstance(y, cc.ArrayMetadata)):
                return False
            if x.shape != y.shape or x.dtype.itemsize != y.dtype.itemsize:
                return False
            continue
        ax, ay = _array(x), _array(y)
        if ax is None or ay is None:
            if (ax is None) != (ay is None):
                return False
            continue
        if ax.shape != ay.shape or ax.tobytes() != ay.tobytes():
            return False
    return True


def same_or_donor(result: Any, original: Any, donor: Any) -> bool:
    """Every array element is the saved one or the other step's (an object swapped)."""
    if _skeleton(result) != _skeleton(original):
        return False
    for r, o, d in zip(_flat(result), _flat(original), _flat(donor), strict=True):
        ar, ao, ad = _array(r), _array(o), _array(d)
        if ar is None or ao is None:
            if r != o and r != d:
                return False
            continue
        if ar.shape != ao.shape:
            return False
        if ar.size and not np.all((ar == ao) | (ar == ad)):
            return False
    return True


class Campaign:
    def __init__(self, backend: str, seed: int, workdir: Path) -> None:
        self.loop = LoopThread("fuzz")
        self.seed = seed
        if backend == "file":
            base = str(workdir / "store")
        else:
            base = f"memory://fuzz-{seed}-{os.urandom(4).hex()}"
        self.store = Store(base, self.loop)
        self.root = self.store.url("ckpt")
        self.saved = save_steps(self.root, STEPS)
        # A canary outside the checkpoint: a JSON item of another run.
        self.store.put("private/secret/data.json", _jsonio.dumps({"password": CANARY}))
        self.store.put("ckpt/private/secret/data.json", _jsonio.dumps({"password": CANARY}))
        self.outside = self._outside()
        self.objects = {s: sorted(self.store.listing(f"ckpt/{s}")) for s in STEPS}
        self.sizes = {s: sum(self.store.listing(f"ckpt/{s}").values()) for s in STEPS}
        with manager(self.root) as m:
            self.reference = {s: self._reads(m, s) for s in STEPS}
        self.inspect_ref = {s: self._inspect_items(s) for s in STEPS}
        # One manager reads every mutation: restore(step) re-checks the commit marker each time.
        self.manager = manager(self.root)
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.by_class: collections.Counter[str] = collections.Counter()
        self.failures: list[dict[str, Any]] = []
        self.peak_alloc = 0
        self.copies = 0
        self.seconds: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}  # one error message per (read, type), for the record

    def _outside(self) -> dict[str, int]:
        return {
            rel: size
            for rel, size in self.store.listing().items()
            if not rel.startswith(("ckpt/1/", "ckpt/2/", "copies/"))
        }

    def _reads(self, m: cc.CheckpointManager, step: int) -> dict[str, Any]:
        target = cc.args.Composite(
            state=cc.args.StandardRestore(state(step)), meta=cc.args.JsonRestore()
        )
        metadata = m.metadata(step)
        return {
            "restore": dict(m.restore(step)),
            "restore_target": dict(m.restore(step, args=target)),
            "metadata": {
                "items": metadata.item_metadata,
                "metrics": metadata.metrics,
                "handlers": metadata.item_handlers,
            },
        }

    def _inspect_items(self, step: int) -> Any:
        code, out, err = run_cli("inspect", "--json", f"{self.root}/{step}")
        assert code == 0, err
        items = json.loads(out)["items"]
        for item in items:
            item.pop("n_objects", None)
            item.pop("stored_bytes", None)
        return items

    # -------------------------------------------------------------------------- run
    def choose(self, rng: random.Random) -> Mutation:
        step = rng.choice(STEPS)
        objects = self.objects[step]
        roll = rng.random()
        if roll < 0.55:
            return mutate_json(rng, self.store, step)
        if roll < 0.93:
            return mutate_bytes(rng, self.store, step, objects)
        return mutate_names(rng, self.store, step, objects)

    def run(self, count: int) -> None:
        for i in range(count):
            rng = random.Random(self.seed * 1_000_003 + i)
            mutation = self.choose(rng)
            print(
                f"mutation {i}: {mutation.cls} {mutation.target} {mutation.detail[:200]}",
                file=sys.stderr,
                flush=True,
            )
            faulthandler.dump_traceback_later(120, exit=True)
            before = {rel: self.store.get(f"ckpt/{rel}") for rel in mutation.writes}
            try:
                try:
                    for rel, data in mutation.writes.items():
                        self._write(rel, data)
                except OSError:  # e.g. a file under a name that is a file on this backend
                    self.by_class["not_applicable"] += 1
                    continue
                self.check(i, mutation)
                self.by_class[mutation.cls] += 1
            finally:
                for rel, data in before.items():
                    try:
                        self._write(rel, data)
                    except FileNotFoundError:
                        pass
                faulthandler.cancel_dump_traceback_later()

    def _write(self, rel: str, data: bytes | None) -> None:
        if data is None:
            if self.store.get(f"ckpt/{rel}") is not None:
                self.store.delete(f"ckpt/{rel}")
        else:
            self.store.put(f"ckpt/{rel}", data)

    def fail(self, i: int, mutation: Mutation, op: str, detail: str) -> None:
        self.counts[op]["FAIL"] += 1
        self.failures.append(
            {
                "index": i,
                "seed": self.seed,
                "class": mutation.cls,
                "target": mutation.target,
                "mutation": mutation.detail[:300],
                "op": op,
                "problem": detail[:2000],
            }
        )

    def guarded(self, i: int, mutation: Mutation, op: str, call: Callable[[], Any]) -> Any:
        """Runs one read; returns its value, or None after recording an acceptable error."""
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()
        began = time.perf_counter()
        try:
            value = call()
        except ACCEPTABLE as exc:
            self.counts[op][f"error:{type(exc).__name__}"] += 1
            self.examples.setdefault(
                f"{op} {type(exc).__name__}", f"{mutation.cls} {mutation.target}: {exc}"[:400]
            )
            if CANARY in str(exc):
                self.fail(i, mutation, op, f"canary in the error: {exc}")
            return None
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.fail(i, mutation, op, f"{type(exc).__name__}: {traceback.format_exc()}")
            return None
        finally:
            _, peak = tracemalloc.get_traced_memory()
            peak -= self.baseline
            self.seconds[op] += time.perf_counter() - began
            self.peak_alloc = max(self.peak_alloc, peak)
            step = int(mutation.target.split("/", 1)[0])
            if peak > 4 * self.sizes[step] + ALLOC_SLACK:
                self.fail(i, mutation, op, f"peak allocation {peak} bytes")
        self.counts[op]["ok"] += 1
        if CANARY in repr(value):
            self.fail(i, mutation, op, "canary from outside the checkpoint in the result")
        return value

    def check(self, i: int, mutation: Mutation) -> None:
        step = int(mutation.target.split("/", 1)[0])
        other = STEPS[0] if step != STEPS[0] else STEPS[1]
        ref, donor = self.reference[step], self.reference[other]
        touched = mutation.target.split("/", 1)[1]
        # Peaks are measured from what is allocated before the reads start.
        self.baseline = tracemalloc.get_traced_memory()[0]  # (0, 0) when not tracing
        m = self.manager
        target = cc.args.Composite(
            state=cc.args.StandardRestore(state(step)), meta=cc.args.JsonRestore()
        )
        for op, call in (
            ("restore", lambda: dict(m.restore(step))),
            ("restore_target", lambda: dict(m.restore(step, args=target))),
            ("metadata", lambda: _metadata(m, step)),
        ):
            value = self.guarded(i, mutation, op, call)
            if value is not None and not self._right(
                op, value, ref[op], donor[op], mutation, touched
            ):
                self.fail(i, mutation, op, f"wrong data: {_clip(value)} vs {_clip(ref[op])}")
        self.cli(i, mutation, step, touched)
        if self._outside() != self.outside:
            self.fail(i, mutation, "outside", "objects outside the checkpoint changed")

    def _right(
        self, op: str, value: Any, ref: Any, donor: Any, mutation: Mutation, touched: str
    ) -> bool:
        if op == "metadata":
            # An item its handler cannot describe is None (documented): a refusal, not data.
            items, want = value["items"], ref["items"]
            if touched == "_CHECKPOINT_METADATA" and mutation.level == "forged":
                # Metrics, timestamps and the list of items are the step metadata's own content.
                return not isinstance(items, dict) or all(
                    items[k] is None or k not in want or same_exact(items[k], want[k])
                    for k in items
                )
            return set(items) == set(want) and all(
                items[k] is None
                or self._right_item(
                    items[k], want[k], donor["items"][k], mutation, touched == f"{k}/pytree.json"
                )
                for k in want
            )
        if mutation.level == "exact":
            return same_exact(value, ref)
        if mutation.level == "swapped":
            return set(value) == set(ref) and all(
                same_or_donor(value[k], ref[k], donor[k]) for k in ref
            )
        # forged: the payload of ``touched`` was rewritten with a valid checksum.
        if touched == "_CHECKPOINT_METADATA":
            # It may name fewer items (as a save of fewer items would); those named are exact.
            return set(value) <= set(ref) and all(same_exact(value[k], ref[k]) for k in value)
        if set(value) != set(ref):
            return False
        for item in ref:
            if touched == f"{item}/data.json":
                continue  # a JSON item's value is free content
            check = same_arrays if touched == f"{item}/pytree.json" else same_exact
            if not check(value[item], ref[item]):
                return False
        return True

    @staticmethod
    def _right_item(value: Any, ref: Any, donor: Any, mutation: Mutation, forged: bool) -> bool:
        """One item's metadata: as saved, the other step's (swapped), same arrays (forged)."""
        if mutation.level == "swapped":
            return same_exact(value, ref) or same_exact(value, donor)
        if mutation.level == "forged" and forged:
            return same_arrays(value, ref)
        return same_exact(value, ref)

    def cli(self, i: int, mutation: Mutation, step: int, touched: str) -> None:
        url = f"{self.root}/{step}"
        self.copies += 1
        dst = self.store.url(f"copies/{self.copies}")
        results = {}
        for op, argv in (
            ("ls", ("ls", "--json", "--all", self.root)),
            ("inspect", ("inspect", "--json", url)),
            ("verify", ("verify", "--json", url)),
            ("cp", ("cp", url, dst)),
        ):
            if tracemalloc.is_tracing():
                tracemalloc.reset_peak()
            began = time.perf_counter()
            try:
                code, out, err = run_cli(*argv)
            finally:
                _, peak = tracemalloc.get_traced_memory()
                peak -= self.baseline
                self.seconds[op] += time.perf_counter() - began
            self.peak_alloc = max(self.peak_alloc, peak)
            if peak > 4 * self.sizes[step] + ALLOC_SLACK:
                self.fail(i, mutation, op, f"peak allocation {peak} bytes")
            results[op] = (code, out, err)
            if code not in (0, 1) or "internal error" in err or "Traceback" in err:
                self.fail(i, mutation, op, f"exit {code}: {err[-1500:]}")
            self.counts[op]["ok" if code == 0 else "error:exit1"] += 1
            if CANARY in out + err:
                self.fail(i, mutation, op, "canary from outside the checkpoint in the output")
        code, out, _ = results["inspect"]
        if code == 0 and mutation.level == "exact":
            items = json.loads(out)["items"]
            for item in items:
                item.pop("n_objects", None)
                item.pop("stored_bytes", None)
            if items != self.inspect_ref[step]:
                self.fail(i, mutation, "inspect", "inspect shows other contents")
        if mutation.detectable and results["verify"][0] == 0:
            self.fail(i, mutation, "verify", "verify says OK for a corrupt checkpoint")
        if mutation.detectable and results["cp"][0] == 0:
            self.fail(i, mutation, "cp", "cp copied a corrupt checkpoint")
        copied = self.store.listing(f"copies/{self.copies}")
        if results["cp"][0] != 0 and copied:
            self.fail(i, mutation, "cp", f"a failed copy left {sorted(copied)[:5]}")
        for rel in copied:
            self.store.delete(f"copies/{self.copies}/{rel}")

    def report(self, seconds: float) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "mutations": sum(n for c, n in self.by_class.items() if c != "not_applicable"),
            "by_class": dict(self.by_class),
            "outcomes": {op: dict(c) for op, c in self.counts.items()},
            "failures": self.failures,
            "examples": self.examples,
            "peak_alloc_bytes": self.peak_alloc,
            "checkpoint_bytes": self.sizes,
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "seconds": round(seconds, 1),
            "seconds_by_op": {op: round(t, 1) for op, t in self.seconds.items()},
        }


def _metadata(m: cc.CheckpointManager, step: int) -> dict[str, Any]:
    metadata = m.metadata(step)
    return {
        "items": metadata.item_metadata,
        "metrics": metadata.metrics,
        "handlers": metadata.item_handlers,
    }


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 600 else text[:600] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["file", "memory"], default="memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="bound each read's peak Python/numpy allocation"
    )
    parser.add_argument(
        "--headroom-mib",
        type=int,
        default=1024,
        help="address space allowed beyond what the set-up used (RLIMIT_AS)",
    )
    args = parser.parse_args(argv)
    faulthandler.enable()
    if args.tracemalloc:
        # Started once: starting and stopping it around each read races with other threads.
        tracemalloc.start()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cloudckpt-fuzz-") as tmp:
        campaign = Campaign(args.backend, args.seed, Path(tmp))
        # From here on no read may grow the address space by more than the headroom: a
        # hostile allocation fails (MemoryError, reported) or aborts (a crash, reported).
        size = _vm_size()
        resource.setrlimit(
            resource.RLIMIT_AS, (size + (args.headroom_mib << 20), resource.RLIM_INFINITY)
        )
        try:
            campaign.run(args.count)
        finally:
            campaign.manager.close()
        report = campaign.report(time.perf_counter() - start)
        report["backend"] = args.backend
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
