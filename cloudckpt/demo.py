"""`make demo`: train, checkpoint asynchronously, crash mid-save, restart, resume.

For each storage location (by default a local S3 server, a local GCS server
and a folder, started here; or ``--url`` for your own bucket) a training
process runs a small MLP sharded over 8 CPU devices with Adam, saving every
``--every`` steps through a CheckpointManager with retention. Mid-way it
kills itself with SIGKILL while a save is committing. A new process then
restores the latest committed step, checks it is bit-for-bit the state that
was saved, and finishes training. The demo prints blocking vs background
time per save, throughput and what is left in storage, and exits non-zero if
anything does not match.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

_ENV_CHILD = "CLOUDCKPT_DEMO_CHILD"
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


# ------------------------------------------------------------------------ the training job
def _train(args: argparse.Namespace) -> None:
    """One training process (a child of the demo)."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import cloudckpt as cc

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

    def sharded(spec: P) -> NamedSharding:
        return NamedSharding(mesh, spec)

    width, hidden = args.width, args.hidden
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}

    def init_params() -> dict[str, jax.Array]:
        k1, k2 = jax.random.split(jax.random.key(0))
        params = {
            "w1": jax.random.normal(k1, (width, hidden), jnp.float32) / np.sqrt(width),
            "b1": jnp.zeros((hidden,), jnp.float32),
            "w2": jax.random.normal(k2, (hidden, width), jnp.float32) / np.sqrt(hidden),
            "b2": jnp.zeros((width,), jnp.float32),
        }
        return {k: jax.device_put(v, sharded(specs[k])) for k, v in params.items()}

    def batch(step: int) -> tuple[jax.Array, jax.Array]:
        key = jax.random.fold_in(jax.random.key(1), step)
        x = jax.random.normal(key, (256, width), jnp.float32)
        y = jnp.tanh(x[:, ::-1])  # a fixed function to learn
        return jax.device_put(x, sharded(P("data"))), jax.device_put(y, sharded(P("data")))

    @jax.jit
    def train_step(
        state: dict[str, Any], x: jax.Array, y: jax.Array
    ) -> tuple[dict[str, Any], jax.Array]:
        def loss_fn(p: dict[str, jax.Array]) -> jax.Array:
            h = jax.nn.gelu(x @ p["w1"] + p["b1"])
            return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        t = state["step"] + 1
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, state["m"], grads)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, state["v"], grads)
        lr = 1e-3 * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        params = jax.tree.map(
            lambda p, m, v: p - lr * m / (jnp.sqrt(v) + 1e-8), state["params"], m, v
        )
        return {"params": params, "m": m, "v": v, "step": t}, loss

    def fresh_state() -> dict[str, Any]:
        params = init_params()
        zeros = jax.tree.map(jnp.zeros_like, params)
        step = jax.device_put(jnp.zeros((), jnp.int32), sharded(P()))
        return {
            "params": params,
            "m": zeros,
            "v": jax.tree.map(jnp.zeros_like, params),
            "step": step,
        }

    def emit(**event: Any) -> None:
        print(json.dumps(event), flush=True)

    options = cc.CheckpointManagerOptions(
        save_interval_steps=args.every, max_to_keep=args.keep, enable_async=True
    )
    mngr = cc.CheckpointManager(args.url, options=options)
    state = fresh_state()
    first = 1
    if args.resume:
        latest = mngr.latest_step()
        if latest is None:
            raise SystemExit(f"nothing to resume from at {args.url}")
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        start = time.perf_counter()
        restored = mngr.restore(
            latest, args=cc.args.Composite(state=cc.args.StandardRestore(target))
        )
        state = restored.state
        emit(
            event="restored",
            step=latest,
            seconds=time.perf_counter() - start,
            checksum=_checksum(state),
        )
        first = latest + 1
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    reported: set[str] = set()

    def report_commits() -> None:
        for timing in mngr.save_timings():
            if timing.commit_s is not None and timing.url not in reported:
                reported.add(timing.url)
                emit(
                    event="committed",
                    step=int(timing.url.rstrip("/").rsplit("/", 1)[-1]),
                    background_s=timing.commit_s,
                )

    for step in range(first, args.steps + 1):
        state, loss = train_step(state, *batch(step))
        report_commits()
        if mngr.should_save(step):
            checksum = _checksum(state)  # of the state handed to save, before training moves on
            mngr.save(
                step,
                args=cc.args.Composite(
                    state=cc.args.StandardSave(state),
                    meta=cc.args.JsonSave({"step": step, "loss": float(loss)}),
                ),
                metrics={"loss": float(loss)},
            )
            report_commits()  # save() waited for the previous commit
            timing = mngr.save_timings()[-1]
            if args.crash_at_save == step:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-commit: the step must not survive
            emit(
                event="save",
                step=step,
                blocking_s=timing.blocking_s,
                nbytes=nbytes,
                checksum=checksum,
            )
    mngr.wait_until_finished()
    report_commits()
    emit(event="done", steps=mngr.all_steps(), loss=float(loss))
    mngr.close()


def _checksum(state: Any) -> str:
    import jax
    import numpy as np

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------ the demo
def _run_child(
    url: str, args: argparse.Namespace, *, resume: bool, crash_at: int | None
) -> list[dict[str, Any]]:
    argv = [
        sys.executable, "-m", "cloudckpt.demo", "--url", url,
        "--steps", str(args.steps), "--every", str(args.every), "--keep", str(args.keep),
        "--width", str(args.width), "--hidden", str(args.hidden),
    ]  # fmt: skip
    if resume:
        argv.append("--resume")
    if crash_at is not None:
        argv += ["--crash-at-save", str(crash_at)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, _ENV_CHILD: "1"}, timeout=900
    )
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # tensorstore and JAX log through glog ("E1129 ..."); keep Python's own lines.
    errors = "\n".join(line for line in proc.stderr.splitlines() if not _GLOG.match(line))[-3000:]
    if crash_at is None and proc.returncode != 0:
        raise RuntimeError(f"training process failed ({proc.returncode}):\n{errors}")
    if crash_at is not None and proc.returncode != -signal.SIGKILL:
        raise RuntimeError(
            f"the training process did not crash as planned ({proc.returncode}):\n{errors}"
        )
    return events


def _listing(url: str) -> list[str]:
    import atomicity
    from cloudckpt.storage.path import StoragePath

    root = StoragePath.from_url(url)

    async def scan() -> list[str]:
        try:
            children = await atomicity.scan(root.backend, root.path, sizes=True)
        finally:
            await root.backend.aclose()
        return [
            f"    {c.name:<8} {'committed' if c.committed else 'UNCOMMITTED':<12} "
            f"{c.n_objects:>4} objects {c.nbytes / 2**20:8.1f} MiB"
            for c in children
        ]

    return asyncio.run(scan())


def _one_location(url: str, args: argparse.Namespace) -> bool:
    print(f"\n=== {url}")
    crash_at = args.every * args.crash_after_saves
    first = _run_child(url, args, resume=False, crash_at=crash_at)
    saves = {e["step"]: e for e in first if e["event"] == "save"}
    print(
        f"  run 1: saved steps {sorted(saves)}, then SIGKILLed itself while step {crash_at} "
        "was committing"
    )
    second = _run_child(url, args, resume=True, crash_at=None)
    restored = next(e for e in second if e["event"] == "restored")
    expected = saves.get(restored["step"])
    ok = (
        expected is not None
        and expected["checksum"] == restored["checksum"]
        and restored["step"] < crash_at
    )
    print(
        f"  run 2: restored step {restored['step']} in {restored['seconds']:.2f}s, checksum "
        f"{restored['checksum']} {'matches' if ok else 'DOES NOT MATCH'} the saved state "
        f"({expected['checksum'] if expected else 'no such save'})"
    )
    done = next(e for e in second if e["event"] == "done")
    print("  run   step   blocking   background   throughput")
    for run, events in (("1", first), ("2", second)):
        committed = {e["step"]: e["background_s"] for e in events if e["event"] == "committed"}
        for e in (e for e in events if e["event"] == "save"):
            background = committed.get(e["step"])
            if background is None:
                shown, rate = "  (killed)", ""
            else:
                shown, rate = (
                    f"{background * 1000:8.0f} ms",
                    f"{e['nbytes'] / background / 2**20:8.0f} MiB/s",
                )
            print(f"  {run:>3} {e['step']:>6} {e['blocking_s'] * 1000:8.1f} ms {shown:>12} {rate}")
        if run == "1":
            print(f"  {run:>3} {crash_at:>6}    killed while committing")
    print(
        f"  state: {saves[min(saves)]['nbytes'] / 2**20:.1f} MiB; final loss {done['loss']:.4f}; "
        f"steps kept: {done['steps']}"
    )
    print("  storage:")
    lines = _listing(url)
    print("\n".join(lines))
    expected_steps = done["steps"]
    listed_ok = all("UNCOMMITTED" not in line for line in lines) and len(lines) == len(
        expected_steps
    )
    if not listed_ok:
        print("  storage listing does not match the committed steps")
    return ok and listed_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", action="append", help="checkpoint root(s); default: local S3, GCS and a folder"
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast run (CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--every", type=int, default=None)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--crash-after-saves", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--crash-at-save", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (24 if args.quick else 40)
    args.every = args.every or (4 if args.quick else 8)
    args.width = args.width or (256 if args.quick else 1024)
    args.hidden = args.hidden or (512 if args.quick else 2048)
    if os.environ.get(_ENV_CHILD):
        args.url = args.url[0]
        _train(args)
        return 0
    if args.every * args.crash_after_saves >= args.steps:
        parser.error("--steps must leave room after the crash (steps > every * crash-after-saves)")
    start = time.perf_counter()
    if args.url:
        results = [_one_location(url, args) for url in args.url]
    else:
        from cloudckpt.testing.servers import local_servers

        with (
            tempfile.TemporaryDirectory(prefix="cloudckpt-demo-") as folder,
            local_servers(buckets=("demo",)) as servers,
        ):
            os.environ.update(servers.env)
            print(f"local servers: {servers.describe()}")
            urls = ["s3://demo/run", "gs://demo/run", os.path.join(folder, "run")]
            results = [_one_location(url, args) for url in urls]
    print(
        f"\n{'all checks passed' if all(results) else 'CHECKS FAILED'} in {time.perf_counter() - start:.0f}s"
    )
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
