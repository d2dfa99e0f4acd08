"""The capped_streams benchmark's pieces: the raw channel's ranges and the report's rows."""

from __future__ import annotations

import pytest

from benchmarks import capped, raw, report


@pytest.mark.parametrize(
    ("size", "span", "expected"),
    [
        (100, None, [(0, 100)]),
        (100, 100, [(0, 100)]),
        (100, 40, [(0, 40), (40, 80), (80, 100)]),
        (0, 40, [(0, 0)]),
    ],
)
def test_raw_ranges_cover_an_object_once(
    size: int, span: int | None, expected: list[tuple[int, int]]
) -> None:
    assert raw.ranges(size, span) == expected


def _result(restore: float, ranged: float) -> dict:
    med = {"restore": restore, "whole": 5.4, "raw_ranged": ranged, "raw_whole": 5.6}
    return {
        "size_mib": 256.0,
        "rate_mbs": 25.0,
        "reps": 3,
        "backends": {
            "gcs": {
                "objects": [128 << 20, 128 << 20],
                "times_s": {k: [v] for k, v in med.items()},
                "median_s": med,
                "restore_over_raw_ranged": restore / ranged,
                "whole_over_restore": 5.4 / restore,
                "equal": True,
            }
        },
    }


def test_the_table_shows_each_backend_and_its_ratios() -> None:
    lines = capped.table_lines(_result(0.7, 0.875))
    assert "each connection held to 25 MB/s, median of 3" in lines[0]
    row = next(line for line in lines if line.startswith("gcs"))
    assert row.split() == [
        "gcs", "2", "x", "128", "MiB", "0.70", "5.40", "0.88", "5.60", "0.80", "7.71", "yes",
    ]  # fmt: skip
    assert capped.table_lines({"backends": {}}) == []


@pytest.mark.parametrize(("restore", "met"), [(0.9, True), (1.2, False)])
def test_the_summary_judges_restore_against_the_ranged_raw_get(restore: float, met: bool) -> None:
    document = {"results": {"capped_streams": _result(restore, 1.0)}}
    got = report.summary(document)["gcs.capped_restore_vs_raw_ranged"]
    assert got["goal"] == 1.1
    assert got["met"] is met
    assert got["value"] == pytest.approx(restore)
