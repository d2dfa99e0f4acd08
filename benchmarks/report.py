"""The summary: key figures against the goals, a text table and a PNG plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

GOALS = {
    "save_vs_raw": 1.1,
    "restore_vs_raw": 1.1,
    "memory_multiple": 1.25,
    "blocking_vs_copy": 1.5,
    "many_leaves_file_s": 1.0,
    "stalled_vs_unstalled": 2.0,
}


def _get(document: dict[str, Any], *path: str) -> Any:
    node: Any = document.get("results", {})
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ok(value: float | None, limit: float) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value <= limit


def summary(document: dict[str, Any]) -> dict[str, Any]:
    """The figures we steer by, each with its goal and whether it is met."""
    out: dict[str, Any] = {}
    for backend, r in (_get(document, "throughput", "backends") or {}).items():
        for key in ("save_vs_raw", "restore_vs_raw"):
            out[f"{backend}.{key}"] = {
                "value": r[key],
                "goal": GOALS[key],
                "met": _ok(r[key], GOALS[key]),
            }
        for key in ("save_vs_orbax", "restore_vs_orbax", "orbax_step_restore_cloudckpt_vs_orbax"):
            if key in r and not math.isnan(r[key]):
                out[f"{backend}.{key}"] = {"value": r[key]}
        tools = r.get("tools") or {}
        if tools:
            value = tools["save_vs_best_tool"]
            goal = GOALS["save_vs_raw"]
            out[f"{backend}.save_vs_best_tool"] = {
                "value": value,
                "goal": goal,
                "met": _ok(value, goal),
            }
        out[f"{backend}.objects"] = {"value": r["objects"].get("cloudckpt", {}).get("count")}
    for backend, floors in ((_get(document, "stragglers") or {}).get("backends") or {}).items():
        for floor, r in floors.items():
            for key in ("save_ratio", "restore_ratio"):
                goal = GOALS["stalled_vs_unstalled"]
                out[f"{backend}.stragglers_{floor}s.{key}"] = {
                    "value": r[key],
                    "goal": goal,
                    "met": _ok(r[key], goal),
                }
    for backend, r in ((_get(document, "capped_streams") or {}).get("backends") or {}).items():
        value, goal = r["restore_over_raw_ranged"], GOALS["restore_vs_raw"]
        out[f"{backend}.capped_restore_vs_raw_ranged"] = {
            "value": value,
            "goal": goal,
            "met": _ok(value, goal),
        }
        out[f"{backend}.capped_one_get_per_object_vs_restore"] = {"value": r["whole_over_restore"]}
    for key, m in (_get(document, "memory") or {}).items():
        goal = GOALS["memory_multiple"] if not key.endswith("_orbax") else None
        out[f"{key}.memory_multiple"] = {
            "value": m["multiple"],
            "goal": goal,
            "met": _ok(m["multiple"], goal) if goal else None,
        }
    blocking = _get(document, "blocking")
    if blocking:
        value = blocking["cloudckpt_vs_copy"]
        out["blocking_vs_copy"] = {
            "value": value,
            "goal": GOALS["blocking_vs_copy"],
            "met": _ok(value, GOALS["blocking_vs_copy"]),
        }
        out["blocking_vs_orbax"] = {"value": blocking["cloudckpt_vs_orbax"]}
    goal = _get(document, "scaling", "goal_many_leaves", "file")
    if goal:
        limit = GOALS["many_leaves_file_s"]
        out["many_leaves_file_s"] = {
            "value": goal["median_s"],
            "goal": limit,
            "met": _ok(goal["median_s"], limit),
        }
        out["many_leaves_file_objects"] = {"value": goal["objects"]}
    awkward = _get(document, "scaling", "awkward_shapes")
    if awkward:
        out["awkward_shapes.prime_vs_regular_save"] = {"value": awkward["prime_vs_regular_save"]}
    for kind in ("sizes", "leaves"):
        linear = _get(document, "scaling", kind, "linear")
        if linear is not None:
            out[f"scaling.{kind}.linear"] = {"value": linear}
    for backend, r in (_get(document, "multiprocess", "backends") or {}).items():
        for key in ("save_2x4_vs_1x8", "restore_2x4_vs_1x8"):
            out[f"{backend}.{key}"] = {"value": r[key]}
    return out


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _mark(value: float | None, goal: float) -> str:
    met = _ok(value, goal)
    return "" if met is None else (" ok" if met else " MISS")


def _exps(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


def _straggler_lines(result: dict[str, Any] | None) -> list[str]:
    if not result or not result.get("backends"):
        return []
    goal = GOALS["stalled_vs_unstalled"]
    rows = []
    for backend, floors in result["backends"].items():
        for floor, r in floors.items():
            base, held = r["unstalled"], r["stalled"]
            rows.append([
                backend, f"{floor}s",
                _f(_median(base["save_s"])), _f(_median(held["save_s"])),
                _f(r["save_ratio"]) + _mark(r["save_ratio"], goal),
                _f(_median(base["restore_s"])), _f(_median(held["restore_s"])),
                _f(r["restore_ratio"]) + _mark(r["restore_ratio"], goal),
                f"{held['stalled']}/{held['requests']}", "yes" if r["equal"] else "NO",
            ])  # fmt: skip
    lines = [f"\n== Stragglers: {result['size_mib']:g} MiB, 1 request in 50 held forever =="]
    lines += _rows(
        ["backend", "floor", "save", "stalled", "ratio", "restore", "stalled", "ratio",
         "held/requests", "equal"],
        rows,
    )  # fmt: skip
    lines.append(
        f"goal: stalled/unstalled <= {goal}. floor = Deadlines.floor_s: a held write is cut "
        "after it and retried; reads are hedged after floor/4"
    )
    return lines


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio_of(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [
        fmt.format(*header),
        fmt.format(*("-" * w for w in widths)),
        *(fmt.format(*r) for r in rows),
    ]


def table(document: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of ``make bench``."""
    lines: list[str] = []
    cfg = document["config"]
    tput = _get(document, "throughput")
    if tput:
        t = tput["tree"]
        lines.append(
            f"\n== Save/restore: {t['bytes'] / 2**20:.0f} MiB tree, {t['leaves']} leaves "
            f"({t['arrays']} jax arrays) on a {t['mesh']} mesh, median of {cfg['reps']} (seconds) =="
        )
        header = ["backend", "save", "raw put", "save/raw", "save/(copy+raw)", "save/engine",
                  "restore", "raw get", "rest/raw", "rest/engine", "objects", "ckpt MiB"]  # fmt: skip
        rows = []
        for name, r in tput["backends"].items():
            med = {k: v["median_s"] for k, v in r["times"].items()}
            obj = r["objects"].get("cloudckpt", {})
            rows.append([
                name, _f(med["save"]), _f(med["raw_put"]),
                _f(r["save_vs_raw"]) + _mark(r["save_vs_raw"], GOALS["save_vs_raw"]),
                _f(r["save_vs_copy_plus_raw"]), _f(r["save_vs_engine"]),
                _f(med["restore"]), _f(med["raw_get"]),
                _f(r["restore_vs_raw"]) + _mark(r["restore_vs_raw"], GOALS["restore_vs_raw"]),
                _f(r["restore_vs_engine"]),
                _f(obj.get("count"), "{}"), _f(obj.get("bytes", 0) / 2**20, "{:.0f}"),
            ])  # fmt: skip
        lines += _rows(header, rows)
        lines.append(
            f"goals: save/raw, restore/raw <= {GOALS['save_vs_raw']}. copy = plain device->host "
            "copy of the replica-0 shards; engine = plain tensorstore writing/reading the same zarr arrays"
        )
        for name, r in tput["backends"].items():
            tools = r.get("tools") or {}
            if not tools:
                continue
            med = {k: v["median_s"] for k, v in r["times"].items()}
            lines.append(f"\n== {name}: the same objects through each client (seconds) ==")
            tool_rows = [
                ["cloudckpt", _f(med["save"]), _f(med["restore"]), "", ""],
                *(
                    [
                        tool,
                        _f(put),
                        _f(tools["get_s"][tool]),
                        _f(ratio_of(med["save"], put)),
                        _f(ratio_of(med["restore"], tools["get_s"][tool])),
                    ]
                    for tool, put in tools["put_s"].items()
                ),
            ]
            lines += _rows(["client", "put", "get", "cc save/put", "cc rest/get"], tool_rows)
            goal = GOALS["save_vs_raw"]
            lines.append(
                f"cloudckpt save / best put {_f(tools['save_vs_best_tool'])}"
                f"{_mark(tools['save_vs_best_tool'], goal)} (goal <= {goal}); restore / best get "
                f"{_f(tools['restore_vs_best_tool'])}. aiobotocore = the raw channel; aiohttp "
                "signs UNSIGNED-PAYLOAD and sends x-amz-checksum-crc32c"
            )
        rows = []
        for name, r in tput["backends"].items():
            if "orbax_save" not in r["times"]:
                continue
            med = {k: v["median_s"] for k, v in r["times"].items()}
            rows.append([
                name, _f(med["save"]), _f(med["orbax_save"]), _f(r["save_vs_orbax"]),
                _f(med["restore"]), _f(med["orbax_restore"]), _f(r["restore_vs_orbax"]),
                _f(r["orbax_save_vs_raw"]), _f(r["orbax_restore_vs_raw"]),
                _f(r["objects"].get("cloudckpt", {}).get("count"), "{}"),
                _f(r["objects"].get("orbax", {}).get("count"), "{}"),
                _f(med.get("cloudckpt_restore_of_orbax")),
                _f(r.get("orbax_step_restore_cloudckpt_vs_orbax")),
            ])  # fmt: skip
        if rows:
            lines.append("\n== Beside Orbax (same tree, same repetitions) ==")
            lines += _rows(
                ["backend", "cc save", "orbax save", "cc/orbax", "cc restore", "orbax rest",
                 "cc/orbax", "orbax save/raw", "orbax rest/raw", "cc objects", "orbax objects",
                 "cc rest of orbax", "/orbax"],
                rows,
            )  # fmt: skip
            lines.append(
                "cc rest of orbax = cloudckpt restoring the checkpoint Orbax wrote; /orbax = that "
                "time over Orbax restoring it (issue 15's goal: <= 1)"
            )
    phases = _get(document, "restore_phases")
    if phases:
        from benchmarks.phases_table import table_lines

        lines += table_lines(phases)
    mem = _get(document, "memory")
    if mem:
        lines.append("\n== Peak RSS of a save above baseline (fresh process each) ==")
        rows = []
        for key, m in mem.items():
            p = m["probes"][-1]
            goal = "" if key.endswith("_orbax") else _mark(m["multiple"], GOALS["memory_multiple"])
            rows.append([key, f"{p['bytes'] / 2**20:.0f}", f"{p['above_baseline'] / 2**20:.0f}",
                         _f(m["multiple"]) + "x" + goal, _f(p["save_s"])])  # fmt: skip
        lines += _rows(["saver", "ckpt MiB", "peak MiB", "multiple", "save s"], rows)
        lines.append(f"goal: cloudckpt multiple <= {GOALS['memory_multiple']}x")
    blk = _get(document, "blocking")
    if blk:
        tm = {k: v["median_s"] for k, v in blk["times"].items()}
        lines.append(f"\n== Async save: time save() blocks ({blk['backend']}) ==")
        rows = [
            ["plain device->host copy", _f(tm["plain_copy"], "{:.3f}"), "1.00", ""],
            ["jax.device_get (zero-copy on CPU)", _f(tm["device_get"], "{:.3f}"), _f(tm["device_get"] / tm["plain_copy"]), ""],
            ["cloudckpt AsyncCheckpointer", _f(tm["cloudckpt_block"], "{:.3f}"),
             _f(blk["cloudckpt_vs_copy"]) + _mark(blk["cloudckpt_vs_copy"], GOALS["blocking_vs_copy"]),
             _f(tm["cloudckpt_total"])],
        ]  # fmt: skip
        if "orbax_block" in tm:
            rows.append(["orbax AsyncCheckpointer", _f(tm["orbax_block"], "{:.3f}"),
                         _f(blk["orbax_vs_copy"]), _f(tm["orbax_total"])])  # fmt: skip
        lines += _rows(["", "blocks s", "vs copy", "commit done s"], rows)
        lines.append(
            f"cloudckpt/orbax blocking: {_f(blk['cloudckpt_vs_orbax'])}; goal: vs copy <= {GOALS['blocking_vs_copy']}"
        )
        many = blk.get("many_leaves")
        if many:
            mt = {k: v["median_s"] for k, v in many["times"].items()}
            lines.append(
                f"{many['leaves']} leaves of {many['leaf_bytes']} B: plain copy "
                f"{_f(mt['plain_copy'], '{:.3f}')}s, cloudckpt blocks "
                f"{_f(mt['cloudckpt_block'], '{:.3f}')}s ({_f(many['cloudckpt_vs_copy'])}x the copy), "
                f"commit done after {_f(mt['cloudckpt_total'])}s"
            )
    sc = _get(document, "scaling")
    if sc:
        s = sc["sizes"]
        lines.append(f"\n== Scaling on {sc['backend']}: save time vs size ==")
        lines += _rows(
            ["MiB", "save s", "MiB/s", "raw put s", "save/raw", "objects"],
            [[_f(p["size_mib"], "{:g}"), _f(p["median_s"]), _f(p["MiBps"], "{:.0f}"), _f(p["raw_put_s"]),
              _f(p["vs_raw"]), str(p["objects"])] for p in s["points"]],
        )  # fmt: skip
        fit = s["fit_seconds_per_MiB"]
        lines.append(
            f"fit: {_f(fit['intercept'], '{:.3f}')} s + {_f(fit['slope'] * 1024, '{:.2f}')} s/GiB; "
            f"growth exponents between sizes {_exps(s['exponents'])} "
            f"-> {'linear' if s['linear'] else 'NOT linear'}"
        )
        lv = sc["leaves"]
        lines.append(
            f"\n== Scaling: save and restore time vs leaf count at {cfg['leaves_total_mib']:g} MiB =="
        )
        lines += _rows(
            ["leaves", "save s", "restore s", "objects"],
            [
                [str(p["leaves"]), _f(p["median_s"], "{:.3f}"),
                 _f(p.get("restore_s", float("nan")), "{:.3f}"), str(p["objects"])]
                for p in lv["points"]
            ],
        )  # fmt: skip
        fit = lv["fit_seconds_per_leaf"]
        lines.append(
            f"fit: {_f(fit['intercept'], '{:.3f}')} s + {_f(lv['us_per_leaf'], '{:.0f}')} us/leaf; "
            f"growth exponents {_exps(lv['exponents'])} -> {'linear' if lv['linear'] else 'NOT linear'}"
        )
        if "restore_us_per_leaf" in lv:
            rfit = lv["restore_fit_seconds_per_leaf"]
            lines.append(
                f"restore fit: {_f(rfit['intercept'], '{:.3f}')} s + "
                f"{_f(lv['restore_us_per_leaf'], '{:.0f}')} us/leaf"
            )
        aw = sc.get("awkward_shapes")
        if aw:
            lines.append("\n== Awkward shapes: same bytes, shard rows prime vs multiple of 128 ==")
            lines += _rows(
                ["shape", "MiB", "save s", "restore s"],
                [[str(tuple(aw[k]["shape"])), _f(aw[k]["bytes"] / 2**20, "{:.0f}"),
                  _f(aw[k]["median_s"], "{:.3f}"), _f(aw[k]["restore_s"], "{:.3f}")]
                 for k in ("regular", "prime")],
            )  # fmt: skip
            lines.append(
                f"prime/regular: save {_f(aw['prime_vs_regular_save'])}x, restore "
                f"{_f(aw['prime_vs_regular_restore'])}x (should be ~1)"
            )
        g = sc["goal_many_leaves"]
        lines.append(f"\n== Goal: {g['leaves']} leaves x {g['leaf_bytes']} B ==")
        rows = []
        for key, r in g.items():
            if isinstance(r, dict):
                mark = _mark(r["median_s"], GOALS["many_leaves_file_s"]) if key == "file" else ""
                rows.append([key, _f(r["median_s"], "{:.3f}") + mark, str(r["objects"])])
        lines += _rows(["saver/backend", "save s", "objects"], rows)
        lines.append(
            f"goal: file backend under {GOALS['many_leaves_file_s']:g} s, object count bounded"
        )
    mp = _get(document, "multiprocess")
    if mp:
        t = mp["tree"]
        lines.append(
            f"\n== Two processes (2x4, jax.distributed) vs one (1x8): {t['bytes'] / 2**20:.0f} MiB "
            f"tree on a {t['mesh']} mesh, median of {mp['reps']} (seconds, barrier to barrier) =="
        )
        rows = []
        for name, r in mp["backends"].items():
            med = {n: {k: v["median_s"] for k, v in tm.items()} for n, tm in r["times"].items()}
            obj = {n: r["objects"].get(n, {}) for n in ("1x8", "2x4")}
            rows.append([
                name, _f(med["1x8"]["save"]), _f(med["2x4"]["save"]), _f(r["save_2x4_vs_1x8"]),
                _f(med["1x8"]["restore"]), _f(med["2x4"]["restore"]), _f(r["restore_2x4_vs_1x8"]),
                _f(r["MiBps"]["2x4"]["save"], "{:.0f}"), _f(r["MiBps"]["2x4"]["restore"], "{:.0f}"),
                f"{_f(obj['1x8'].get('count'), '{}')}/{_f(obj['2x4'].get('count'), '{}')}",
                "yes" if r["verified"] else "NO",
            ])  # fmt: skip
        lines += _rows(
            ["backend", "1x8 save", "2x4 save", "2x4/1x8", "1x8 restore", "2x4 restore",
             "2x4/1x8", "2x4 save MiB/s", "2x4 rest MiB/s", "objects 1x8/2x4", "verified"],
            rows,
        )  # fmt: skip
        lines.append(
            "each time: max over processes, barrier before to barrier after; both topologies share "
            "this machine's cores and servers, so ~1 means no multi-process overhead"
        )
    lines += _straggler_lines(_get(document, "stragglers"))
    # Issue 14's scenarios print their own rows.
    from benchmarks import capped, io_bytes, latency, listing, protocol, scale_model

    if _get(document, "io_bytes"):
        lines += io_bytes.table_lines(document["results"]["io_bytes"])
    if _get(document, "listing"):
        lines += listing.table_lines(document["results"]["listing"])
    if _get(document, "protocol"):
        lines += protocol.table_lines(document["results"]["protocol"])
    if _get(document, "restore_latency"):
        lines += latency.table_lines(document["results"]["restore_latency"])
    if _get(document, "scale_model"):
        lines += scale_model.table_lines(document["results"]["scale_model"])
    if _get(document, "capped_streams"):
        lines += capped.table_lines(document["results"]["capped_streams"])
    lines.append(
        f"\ntotal runtime {document['total_seconds']:.0f}s; scenarios: {document['scenario_seconds']}"
    )
    after = document.get("machine_load", {}).get("after", {})
    if after:
        pressure = after.get("cpu_pressure_some", {}).get("avg300")
        lines.append(
            f"machine load at the end: loadavg {', '.join(f'{x:.1f}' for x in after['loadavg'])} "
            f"on {document['environment']['cpus']} CPUs"
            + (f"; CPU pressure (some, 5 min) {pressure:.0f}%" if pressure is not None else "")
            + ". Absolute times compare across runs only on an idle machine; ratios do."
        )
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> Path | None:
    """Writes the PNG; returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    _plot_times(axes[0][0], document)
    _plot_ratios(axes[0][1], document)
    _plot_memory_blocking(axes[0][2], document)
    _plot_sizes(axes[1][0], document)
    _plot_leaves(axes[1][1], document)
    _plot_goal(axes[1][2], document)
    cfg = document["config"]
    fig.suptitle(
        f"cloudckpt benchmark - {cfg['size_mib']:g} MiB tree, median of {cfg['reps']} - "
        f"{document['created']}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if v is None or math.isnan(v) else v for v in values], width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def _plot_times(ax: Any, document: dict[str, Any]) -> None:
    backends = _get(document, "throughput", "backends") or {}
    names = list(backends)
    series = {}
    for key in (
        "save",
        "raw_put",
        "engine_save",
        "orbax_save",
        "restore",
        "raw_get",
        "engine_restore",
        "orbax_restore",
    ):
        series[key] = [backends[n]["times"].get(key, {}).get("median_s", math.nan) for n in names]
    _bars(ax, names, series)
    ax.set_title("median seconds")


def _plot_ratios(ax: Any, document: dict[str, Any]) -> None:
    backends = _get(document, "throughput", "backends") or {}
    names = list(backends)
    keys = ("save_vs_raw", "restore_vs_raw", "save_vs_orbax", "restore_vs_orbax")
    _bars(ax, names, {k: [backends[n][k] for n in names] for k in keys})
    ax.axhline(GOALS["save_vs_raw"], color="red", linestyle="--", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_title("ratios (red: goal vs raw)")


def _plot_memory_blocking(ax: Any, document: dict[str, Any]) -> None:
    labels, values = [], []
    for key, m in (_get(document, "memory") or {}).items():
        labels.append(f"mem {key}")
        values.append(m["multiple"])
    blk = _get(document, "blocking")
    if blk:
        labels += ["block cc/copy", "block orbax/copy"]
        values += [blk["cloudckpt_vs_copy"], blk["orbax_vs_copy"]]
    ax.bar(range(len(values)), [0 if math.isnan(v) else v for v in values])
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right", fontsize=8)
    ax.axhline(GOALS["memory_multiple"], color="red", linestyle="--", linewidth=1)
    ax.axhline(GOALS["blocking_vs_copy"], color="orange", linestyle="--", linewidth=1)
    ax.set_title("memory multiple (red goal), blocking/copy (orange goal)")


def _plot_sizes(ax: Any, document: dict[str, Any]) -> None:
    s = _get(document, "scaling", "sizes")
    if not s:
        return
    xs = [p["size_mib"] for p in s["points"]]
    ax.plot(xs, [p["median_s"] for p in s["points"]], "o-", label="cloudckpt save")
    ax.plot(xs, [p["raw_put_s"] for p in s["points"]], "s--", label="raw put")
    fit = s["fit_seconds_per_MiB"]
    if not math.isnan(fit["slope"]):
        ax.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], ":", label="linear fit")
    ax.set_xlabel("MiB")
    ax.set_ylabel("s")
    ax.legend(fontsize=8)
    ax.set_title("save time vs size (file)")


def _plot_leaves(ax: Any, document: dict[str, Any]) -> None:
    lv = _get(document, "scaling", "leaves")
    if not lv:
        return
    xs = [p["leaves"] for p in lv["points"]]
    ax.plot(xs, [p["median_s"] for p in lv["points"]], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("leaves (fixed total bytes)")
    ax.set_ylabel("s")
    ax.set_title("save time vs leaf count (file)")


def _plot_goal(ax: Any, document: dict[str, Any]) -> None:
    g = _get(document, "scaling", "goal_many_leaves")
    if not g:
        return
    keys = [k for k, v in g.items() if isinstance(v, dict)]
    ax.bar(range(len(keys)), [g[k]["median_s"] for k in keys])
    ax.set_xticks(range(len(keys)), keys)
    ax.axhline(GOALS["many_leaves_file_s"], color="red", linestyle="--", linewidth=1)
    ax.set_title(f"{g['leaves']} leaves x {g['leaf_bytes']} B: save s")
