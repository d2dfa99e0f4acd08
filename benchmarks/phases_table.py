"""The phase table of ``make bench``: the restore_phases scenario's result, as text."""

from __future__ import annotations

from typing import Any


def _missing(value: Any) -> bool:
    # A ratio without its yardstick is NaN in a live result and null once written as JSON.
    return value is None or (isinstance(value, float) and value != value)


def _ms(value: Any) -> str:
    return "-" if _missing(value) else f"{value * 1000:.0f}"


def _x(value: Any) -> str:
    return "-" if _missing(value) else f"{value:.2f}"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The phase table of ``make bench`` (milliseconds, medians), one column per backend."""
    backends = result["backends"]
    names = list(backends)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Any) -> None:
        rows.append((label, [fn(backends[n]) for n in names]))

    def t(key: str) -> Any:
        return lambda r: _ms(r["times"].get(key, {}).get("median_s"))

    def runs(key: str) -> Any:
        # Every repetition's ratio, so the worst run shows beside the median.
        return lambda r: "/".join(f"{x:.2f}" for x in r["ratios"].get(key, [])) or "-"

    # The process's CPU in each timed restore: a slow run whose user time held and whose
    # system time doubled paid for new memory (see benchmarks/phases.py), not for its code.
    def cpu(which: str) -> Any:
        def cell(r: dict[str, Any]) -> str:
            used = r.get("cpu", {}).get(which, {})
            pairs = zip(used.get("user_s", []), used.get("sys_s", []), strict=True)
            return "/".join(f"{u:.2f}+{s:.2f}" for u, s in pairs) or "-"

        return cell

    # One figure of each timed restore (``which``), per run: ``key`` of its record, scaled.
    def each(which: str, key: str, fmt: str, scale: float = 1.0) -> Any:
        def cell(r: dict[str, Any]) -> str:
            values = r.get("cpu", {}).get(which, {}).get(key, [])
            return "/".join(format(x * scale, fmt) for x in values) or "-"

        return cell

    def base(r: dict[str, Any]) -> str:
        return "fromfile" if "restore/fromfile" in r["ratios"] else "raw_get"

    row("pytree.json read+parse", t("document"))
    row("packed reads", t("packs"))
    row("tensorstore opens", t("open"))
    row("array reads (GET+crc32c+copy)", t("reads"))
    row("assembly (make_array_from_callback)", t("assemble"))
    row("= sum of phases", lambda r: _ms(r["phase_sum_s"]))
    row("handler restore", t("handler"))
    row("Checkpointer.restore", t("restore"))
    row("Checkpointer.restore onto a 2x4 mesh", t("resharded"))
    row("raw concurrent GET, same sizes", t("raw_get"))
    row("np.fromfile of the files, arrays kept", t("fromfile"))
    row("np.fromfile, each array freed at once", t("fromfile_freed"))
    row("one crc32c pass over the bytes", t("crc32c"))
    row("one memcpy of the bytes", t("memcpy"))
    row("Orbax restore", t("orbax"))
    row("Orbax restore onto a 2x4 mesh", t("orbax_resharded"))
    row("restore / raw GET", lambda r: _x(r.get("restore_vs_raw_get")))
    row("2x4 restore / raw GET", lambda r: _x(r.get("resharded_vs_raw_get")))
    row("restore / np.fromfile", lambda r: _x(r.get("restore_vs_fromfile")))
    row("restore / np.fromfile, freed", lambda r: _x(r.get("restore_vs_fromfile_freed")))
    row("restore / Orbax (median, worst)", lambda r: f"{_x(r.get('restore_vs_orbax'))}, "
        f"{_x(r.get('restore_vs_orbax_worst'))}")  # fmt: skip
    row("2x4: restore / Orbax (median, worst)", lambda r: f"{_x(r.get('resharded_vs_orbax'))}, "
        f"{_x(r.get('resharded_vs_orbax_worst'))}")  # fmt: skip
    row("each run: restore / yardstick", lambda r: runs(f"restore/{base(r)}")(r))
    row("each run: 2x4 restore / yardstick", lambda r: runs(f"resharded/{base(r)}")(r))
    row("each run: restore / np.fromfile, freed", runs("restore/fromfile_freed"))
    row("each run: restore / Orbax", runs("restore/orbax"))
    row("each run: 2x4 restore / Orbax 2x4", runs("resharded/orbax"))
    row(
        "each run: timed first after yardstick",
        lambda r: "/".join("Orbax" if x else "ours" for x in r.get("orbax_first", [])) or "-",
    )
    row("each run: CPU s user+system, restore", cpu("restore"))
    row("each run: CPU s user+system, 2x4", cpu("resharded"))
    row("each run: CPU s user+system, Orbax", cpu("orbax"))
    row("each run: CPU s user+system, Orbax 2x4", cpu("orbax_resharded"))
    row("each run: minor faults k, restore", each("restore", "minor_faults", ".0f", 1e-3))
    row("each run: minor faults k, 2x4", each("resharded", "minor_faults", ".0f", 1e-3))
    # Who else had the cores: the local server (object stores), idle time, the hypervisor.
    row("each run: server CPU s, restore", each("restore", "server_s", ".2f"))
    row("each run: server CPU s, 2x4", each("resharded", "server_s", ".2f"))
    row("each run: machine idle, 2x4", each("resharded", "idle_share", ".0%"))
    row("each run: steal, 2x4", each("resharded", "steal_share", ".0%"))
    row("page cache (file)", lambda r: str(r.get("cache", "-")))
    row("objects (raw GETs)", lambda r: str(r["requests"].get("objects", "-")))
    row("direct chunk reads (requests)", lambda r: str(r["requests"].get("direct_reads", "-")))
    row("tensorstore reads (batched)", lambda r: f"{r['requests'].get('tensorstore_reads', '-')} "
        f"({r['requests'].get('tensorstore_batch_reads', '-')})")  # fmt: skip
    row(
        "tensorstore reads onto the 2x4 mesh",
        lambda r: str(r["requests"].get("resharded_reads", "-")),
    )
    row("MiB read / MiB restored", lambda r: f"{(r['requests'].get('tensorstore_bytes', 0) + r['requests'].get('direct_bytes', 0)) / 2**20:.0f}"
        f" / {r['requests'].get('restored_bytes', 0) / 2**20:.0f}")  # fmt: skip
    row("peak RSS above baseline", lambda r: f"{r['rss']['multiple']:.2f}x")
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    head = f"{'ms (median)':<{width}}  " + "  ".join(
        f"{n:>{c}}" for n, c in zip(names, cols, strict=True)
    )
    lines = [
        f"\n== Restore phases: {result['bytes'] / 2**20:.0f} MiB tree, each phase timed alone, "
        f"median of {result.get('reps', '?')}; file reads with a {result.get('file_cache', '?')} "
        "page cache on both sides ==",
        head,
        "-" * len(head),
    ]
    for label, values in rows:
        lines.append(
            f"{label:<{width}}  "
            + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols, strict=True))
        )
    lines.append(
        "goals: restore/raw GET <= 1.1 (s3, gcs); restore/np.fromfile <= 2 (file); "
        "restore/Orbax <= 0.6 every run (file, gcs); RSS <= 1.25x. Yardstick: np.fromfile on "
        "file, the raw GET on object stores, timed just before the restore it is compared to"
    )
    return lines
