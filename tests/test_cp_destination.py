"""Where ``cloudckpt cp SRC DST`` copies to (tools.transfer.destination_url), decided before any I/O."""

from __future__ import annotations

import pytest

from cloudckpt.tools.transfer import destination_url


@pytest.mark.parametrize(
    "src,dst,expected",
    [
        ("gs://a/run/12", "s3://b/other/12", "s3://b/other/12"),  # a full step URL: as given
        ("gs://a/run/12", "s3://b/other/", "s3://b/other/12"),  # into a directory, like cp(1)
        ("gs://a/run/12/", "/tmp/runs/", "/tmp/runs/12"),  # a trailing slash on SRC is no name
    ],
)
def test_destination(src: str, dst: str, expected: str) -> None:
    assert destination_url(src, dst) == expected


@pytest.mark.parametrize("src", ["gs://a/run/..", "gs://a/run/.", "/"])
def test_a_source_without_a_step_name_cannot_go_into_a_directory(src: str) -> None:
    with pytest.raises(ValueError, match="is not a step name; give the destination step in full"):
        destination_url(src, "s3://b/other/")
