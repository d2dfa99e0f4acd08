"""The ``cloudckpt`` command line: inspect and repair checkpoints without writing Python.

Commands: ``ls``, ``inspect``, ``verify``, ``gc``, ``rm``, ``cp`` and
``doctor``; ``cloudckpt COMMAND --help`` describes each. URLs are
``gs://bucket/prefix``, ``s3://bucket/prefix``, ``file:///path`` or plain
paths; endpoints and credentials come from the environment exactly as for the
library (``AWS_ENDPOINT_URL``, the AWS credential chain,
``STORAGE_EMULATOR_HOST``, Application Default Credentials).

Exit status: 0 on success, 1 when the command failed or found a problem
(``verify``: something corrupt or missing; ``doctor``: a failed check), 2 for
a usage error, 130 when interrupted. Errors are one line on stderr naming
what, where and what to do; ``--debug`` adds the traceback and DEBUG logs.
Credentials never appear in the output or the logs: secret environment
values, credential headers and signed-URL parameters are redacted
(:mod:`cloudckpt.storage.redact`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TextIO

from cloudckpt.console import (
    Console,
    claim_text,
    debug_logging,
    error_text,
    human_bytes,
    metrics_text,
    table_lines,
    utc,
)
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage import BackendCache, RetryPolicy
from cloudckpt.storage.path import StoragePath
from cloudckpt.tools import doctor as _doctor
from cloudckpt.tools import inspect as _inspect
from cloudckpt.tools import transfer as _transfer
from cloudckpt.tools import verify as _verify

PROG = "cloudckpt"
#: Doctor gives up on an unreachable endpoint quickly instead of retrying for minutes.
DOCTOR_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.2, max_backoff_s=2.0, max_total_s=20)


# ----------------------------------------------------------------------------- commands
class CommandFailed(Exception):
    """The command ran but found a problem; its report is already printed."""


def _location(args: argparse.Namespace, url: str, **options: Any) -> StoragePath:
    """``url`` through the command's own backends (``args.backends``, closed by ``main``)."""
    return StoragePath.from_url(url, cache=args.backends, **options)


async def cmd_ls(args: argparse.Namespace, con: Console) -> None:
    root = _location(args, args.url)
    rows = await _inspect.list_steps(root, read_claims=args.all, sizes=args.sizes)
    shown = rows if args.all else [r for r in rows if r.committed]
    if args.json:
        con.json([r.to_json() for r in shown])
        return
    if not shown:
        hidden = len(rows) - len(shown)
        more = f" ({hidden} uncommitted: --all shows them)" if hidden else ""
        if not rows and await _inspect.is_committed_step(root):
            more = f"; {root} is itself a checkpoint: `cloudckpt inspect {root}` describes it"
        con.err(f"no committed checkpoints under {root}{more}")
        return
    # Sizes need every object listed; without --sizes the listing is per step only.
    sized = ["SIZE", "OBJECTS"] if args.sizes else []
    table = [["STEP", "STATUS", "TIME (UTC)", *sized, "ITEMS", "METRICS / CLAIM"]]
    for r in shown:
        if r.format == "orbax":  # Orbax hook: read-only steps another library wrote
            status = "orbax" if r.committed else "UNCOMMITTED orbax"
            when, details = utc(r.commit_time or r.mtime), r.problem or metrics_text(r.metrics)
        elif r.committed:
            status, when = "committed", utc(r.commit_time or r.mtime)
            details = r.problem or metrics_text(r.metrics)
        else:
            status, when, details = "UNCOMMITTED", utc(r.mtime), claim_text(r.claim)
        table.append(
            [
                r.name,
                status,
                when,
                *([human_bytes(r.nbytes or 0), str(r.n_objects or 0)] if args.sizes else []),
                ",".join(r.items) or "-",
                details,
            ]
        )
    for line in table_lines(table):
        con.out(line)


async def cmd_inspect(args: argparse.Namespace, con: Console) -> None:
    step = _location(args, args.url)
    info = await _inspect.describe_step(step)
    if args.json:
        con.json(info)
        return
    meta = info["metadata"]
    commit_ns, init_ns = meta.get("commit_timestamp_nsecs"), meta.get("init_timestamp_nsecs")
    took = f" (save took {(commit_ns - init_ns) / 1e9:.2f}s)" if commit_ns and init_ns else ""
    con.out(f"checkpoint  {info['url']}")
    con.out(f"committed   {utc(commit_ns / 1e9 if commit_ns else None)} UTC{took}")
    con.out(f"stored      {human_bytes(info['nbytes'])} in {info['n_objects']} objects")
    con.out(f"format      {info.get('format', meta.get('format_version'))}")
    con.out(f"metrics     {metrics_text(meta.get('metrics') or {})}")
    if meta.get("custom"):
        con.out(f"custom      {json.dumps(meta['custom'], sort_keys=True)}")
    for item in info["items"]:
        title = f"item {item['name']!r}" if item["name"] else "item (the whole checkpoint)"
        stored = (
            f", {human_bytes(item['stored_bytes'])} in {item['n_objects']} objects"
            if item["n_objects"] is not None
            else ""
        )
        con.out("")
        if item["kind"] == "pytree":
            leaves = item["leaves"]
            con.out(
                f"{title}: pytree, {len(leaves)} leaves, {human_bytes(item['nbytes'])} of data"
                f"{stored}"
            )
            rows = [["PATH", "DTYPE", "SHAPE", "SHARDING", "BYTES", "STORAGE"]]
            for leaf in leaves:
                if leaf["dtype"] == "str":
                    rows.append(
                        [leaf["path"], "str", "-", "-", human_bytes(leaf["nbytes"]), "inline"]
                    )
                    continue
                rows.append(
                    [
                        leaf["path"],
                        str(leaf["dtype"]),
                        "("
                        + ", ".join(map(str, leaf["shape"]))
                        + ("," if len(leaf["shape"]) == 1 else "")
                        + ")",
                        _inspect.describe_sharding(leaf["sharding"]),
                        human_bytes(leaf["nbytes"]),
                        str(leaf["storage"]),
                    ]
                )
            for line in table_lines(rows):
                con.out("  " + line)
        elif item["kind"] == "json":
            con.out(f"{title}: JSON{stored}")
            lines = json.dumps(item["value"], indent=2, sort_keys=True).splitlines()
            for line in lines[:40]:
                con.out("  " + line)
            if len(lines) > 40:
                con.out(f"  ... ({len(lines) - 40} more lines; --json shows everything)")
        else:
            con.out(f"{title}: saved by {item['handler']}{stored}")
            for rel in item["objects"][:20]:
                con.out(f"  {rel}")


def _print_verify(report: _verify.VerifyReport, con: Console, elapsed: float) -> None:
    for problem in report.problems:
        con.out(f"{problem.kind.upper()}  {problem.url}: {problem.detail}")
    for note in report.notes:
        con.out(f"note: {note}")
    if report.ok:
        con.out(
            f"OK  {report.url}: {report.objects_read} objects, {human_bytes(report.nbytes)} read, "
            f"{report.checksums} checksums verified in {elapsed:.2f}s"
        )


def _verify_failure(report: _verify.VerifyReport) -> str:
    counts: dict[str, int] = {}
    for p in report.problems:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    what = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return (
        f"verification failed: {report.url} has {what} object(s) (listed above); restore from "
        "another step, or copy a good replica over it with `cloudckpt cp --force`"
    )


async def cmd_verify(args: argparse.Namespace, con: Console) -> None:
    step = _location(args, args.url)
    start = time.perf_counter()
    report = await _verify.verify_step(step, progress=con.progress)
    if args.json:
        con.json(report.to_json())
    else:
        _print_verify(report, con, time.perf_counter() - start)
    if not report.ok:
        raise CommandFailed(_verify_failure(report))


async def cmd_gc(args: argparse.Namespace, con: Console) -> None:
    root = _location(args, args.url)
    report = await _transfer.collect_garbage(root, yes=args.yes, include_live=args.include_live)
    if args.json:
        con.json(report.to_json())
        return
    labels = {
        "delete": "would delete",
        "spare": "sparing",
        "deleted": "deleted",
        "sweep": "would sweep",
        "swept": "swept",
    }
    rows = [
        [
            labels.get(e.action, e.action),
            e.url,
            f"{e.n_objects} objects",
            human_bytes(e.nbytes),
            e.reason,
        ]
        for e in report.entries
    ]
    for line in table_lines(rows) if rows else []:
        con.out(line)
    doomed = [e for e in report.entries if e.action == "delete"]
    done = [e for e in report.entries if e.action == "deleted"]
    swept = [e for e in report.entries if e.action in ("sweep", "swept")]
    spared = len(report.entries) - len(doomed) - len(done) - len(swept)
    tail = f"{report.committed} committed step(s) untouched"
    if spared:
        tail += f", {spared} spared"
    if args.yes:
        freed = human_bytes(sum(e.nbytes for e in done))
        con.out(f"deleted {len(done)} uncommitted step(s) ({freed}) under {root}; {tail}")
    elif doomed:
        con.out(
            f"dry run: nothing deleted under {root}; {tail}. Run again with --yes to delete "
            f"{len(doomed)} uncommitted step(s) ({human_bytes(sum(e.nbytes for e in doomed))})"
        )
    else:
        con.out(f"nothing to delete under {root}; {tail}")


async def cmd_rm(args: argparse.Namespace, con: Console) -> None:
    step = _location(args, args.url)
    report = await _transfer.remove_step(step, yes=args.yes)
    if args.json:
        con.json(report.to_json())
        return
    size = f"{report.n_objects} objects, {human_bytes(report.nbytes)}"
    if report.deleted:
        con.out(f"deleted {report.url} ({size}); its commit marker went first")
    else:
        con.out(
            f"dry run: would delete the committed checkpoint {report.url} ({size}); run again "
            "with --yes to delete it"
        )


async def cmd_cp(args: argparse.Namespace, con: Console) -> None:
    if args.all:  # every committed step of a root; Orbax steps are converted
        from cloudckpt.tools import orbax as orbax_tools

        result = await orbax_tools.copy_all(
            _location(args, args.src),
            _location(args, args.dst),
            force=args.force,
            verify_copy=not args.no_verify,
            progress=con.progress,
        )
        if args.json:
            con.json(result)
            return
        for entry in result["copied"]:
            how = "converted from Orbax" if entry["converted_from_orbax"] else "copied"
            con.out(f"{how} {entry['src']} -> {entry['dst']}: {entry['n_objects']} objects")
        skipped = result["skipped"]
        con.out(
            f"{len(result['copied'])} step(s) committed under {result['dst']}"
            + (f"; {len(skipped)} already there, skipped: {', '.join(skipped)}" if skipped else "")
        )
        return
    src = _location(args, args.src)
    dst = _location(args, _transfer.destination_url(args.src, args.dst))
    start = time.perf_counter()
    report = await _transfer.copy_step(
        src, dst, force=args.force, verify=not args.no_verify, progress=con.progress
    )
    elapsed = time.perf_counter() - start
    if args.json:
        con.json(report.to_json())
        return
    rate = human_bytes(report.nbytes / max(elapsed, 1e-6))
    checked = (
        f"; verified {report.verify.checksums} checksums"
        if report.verify is not None
        else "; not verified (--no-verify)"
    )
    replaced = " (replaced the checkpoint that was there)" if report.replaced else ""
    con.out(
        f"copied {report.src} -> {report.dst}{replaced}: {report.n_objects} objects, "
        f"{human_bytes(report.nbytes)} in {elapsed:.2f}s ({rate}/s){checked}; committed"
    )


async def cmd_doctor(args: argparse.Namespace, con: Console) -> None:
    root = _location(args, args.url, retry=DOCTOR_RETRY)
    report = await _doctor.run_doctor(root)
    if args.json:
        con.json(report.to_json())
    else:
        tags = {
            _doctor.OK: "[ok]",
            _doctor.FAIL: "[FAIL]",
            _doctor.WARN: "[fix]",
            _doctor.UNKNOWN: "[?]",
            _doctor.INFO: "[info]",
        }
        con.out(f"doctor {report.url}")
        con.out(f"  store: {report.store}")
        for check in report.checks:
            con.out(f"  {tags[check.status]:<7}{check.name}: {check.detail}")
            if check.fix and check.status in (_doctor.FAIL, _doctor.WARN, _doctor.UNKNOWN):
                con.out(f"{'':9}what to do: {check.fix}")
        con.out(
            f"summary: {report.count(_doctor.OK)} ok, {report.count(_doctor.FAIL)} failed, "
            f"{report.count(_doctor.WARN)} to fix, {report.count(_doctor.UNKNOWN)} could not check"
        )
    failed = report.count(_doctor.FAIL)
    to_fix = report.count(_doctor.WARN)
    if failed:
        raise CommandFailed(
            f"{failed} check(s) failed for {report.url}; fix what is listed above before "
            "training against it"
        )
    if args.strict and to_fix:
        raise CommandFailed(f"{to_fix} setting(s) of {report.url} to fix (--strict)")


# -------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, verify, copy and clean up cloudckpt checkpoints on GCS, S3 and "
        "the local file system.",
        epilog="URLs: gs://bucket/prefix, s3://bucket/prefix, file:///path or a path. "
        "Endpoints and credentials come from the environment (AWS_ENDPOINT_URL, the AWS "
        "credential chain, STORAGE_EMULATOR_HOST, Application Default Credentials).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Accepted before or after the command; SUPPRESS keeps a subcommand from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    for p in (parser, common):
        default = False if p is parser else argparse.SUPPRESS
        p.add_argument(
            "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
        )
        p.add_argument(
            "-q", "--quiet", action="store_true", default=default, help="no progress output"
        )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, fn: Callable[..., Any]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.set_defaults(func=fn)
        return p

    p = command("ls", "list the committed steps under a root", cmd_ls)
    p.add_argument("url", metavar="URL", help="root of the steps, e.g. gs://bucket/run")
    p.add_argument(
        "-a",
        "--all",
        action="store_true",
        help="also show uncommitted (crashed or in-progress) saves",
    )
    p.add_argument(
        "-l",
        "--sizes",
        action="store_true",
        help="also show each step's size and object count (lists every object: slower "
        "on large roots)",
    )

    p = command(
        "inspect", "show a step's metadata and its arrays (reads no array data)", cmd_inspect
    )
    p.add_argument("url", metavar="URL/STEP", help="the checkpoint, e.g. s3://bucket/run/1000")

    p = command("verify", "read every object of a step and check every checksum", cmd_verify)
    p.add_argument("url", metavar="URL/STEP", help="the checkpoint to verify")

    p = command(
        "gc",
        "delete uncommitted steps (crashed saves) under a root; dry run unless --yes",
        cmd_gc,
    )
    p.add_argument("url", metavar="URL", help="root of the steps")
    p.add_argument("-y", "--yes", action="store_true", help="really delete")
    p.add_argument(
        "--include-live",
        action="store_true",
        help="also delete saves whose claim is live (a writer may still be running!)",
    )

    p = command(
        "rm", "delete one committed step safely (marker first); dry run unless --yes", cmd_rm
    )
    p.add_argument("url", metavar="URL/STEP", help="the checkpoint to delete")
    p.add_argument("-y", "--yes", action="store_true", help="really delete")

    p = command(
        "cp",
        "copy a committed step between any two stores, committing it last and verifying it",
        cmd_cp,
    )
    p.add_argument("src", metavar="SRC", help="the committed source step, e.g. gs://a/run/1000")
    p.add_argument(
        "dst",
        metavar="DST",
        help="the destination step (a trailing / copies into that directory under the same name)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace a committed checkpoint at DST (deleted first)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip reading the copy back")
    p.add_argument(
        "--all",
        action="store_true",
        help="SRC and DST are roots: copy every committed step (Orbax steps are converted); "
        "steps already committed at DST are skipped unless --force",
    )

    p = command(
        "doctor",
        "check that a bucket (or directory) works for checkpoints and report settings to fix",
        cmd_doctor,
    )
    p.add_argument("url", metavar="URL", help="where checkpoints will go, e.g. s3://bucket/run")
    p.add_argument("--strict", action="store_true", help="exit 1 when a setting needs fixing")
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("cloudckpt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------- main
def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Runs the command line; returns the exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error, already printed by argparse
        return int(exc.code or 0)
    con = Console(stdout, stderr, quiet=args.quiet)
    undo_logging = debug_logging(stderr) if args.debug else lambda: None
    prefix = f"{PROG} {args.command}"
    loop = LoopThread(f"{PROG}-cli")
    args.backends = BackendCache()  # what the command opens, closed on its loop below
    try:
        coro: Coroutine[Any, Any, None] = args.func(args, con)
        loop.run(coro)
        return 0
    except CommandFailed as exc:
        con.err(f"{prefix}: {exc}")
        return 1
    except KeyboardInterrupt:
        con.err(f"{prefix}: interrupted")
        return 130
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as exc:
        if args.debug:
            con.err(traceback.format_exc().rstrip())
        con.err(f"{prefix}: error: {error_text(exc)}")
        return 1
    except Exception as exc:
        if args.debug:
            con.err(traceback.format_exc().rstrip())
        con.err(
            f"{prefix}: internal error: {type(exc).__name__}: {error_text(exc)} (run with "
            "--debug for the traceback, and please report it)"
        )
        return 1
    finally:
        loop.close(cleanup=args.backends.aclose())
        undo_logging()
