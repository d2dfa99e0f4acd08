"""``cloudckpt cp`` stays inside its destination and never reads through symbolic links.

Keys listed from a source are untrusted: on S3 and GCS a key may be
``run/5/../../x``, which names a path outside the destination once joined
onto a directory. Crafted sources are built by writing objects directly into
a real committed checkpoint. The sources are in memory, which stores keys
verbatim as S3 and GCS do: SeaweedFS refuses keys with ``..`` segments
(InvalidRequest) and fake-gcs-server normalises them, so neither emulator can
hold such a source. fake-gcs-server's normalising is used as a destination
instead: a key that climbed would land outside the copy there, as on a file
system. What lands in (and beside) each destination is checked by walking it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import cloudckpt as cc
from cloudckpt import storage as backends
from cloudckpt.cli import main
from cloudckpt.engine.loop import LoopThread

from .backend_harness import make_store


def _save(url: str) -> None:
    tree = {"w": np.arange(2048, dtype=np.float32), "b": np.ones(4, np.float32)}
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            url,
            args=cc.args.Composite(
                state=cc.args.StandardSave(tree), meta=cc.args.JsonSave({"lr": 0.1})
            ),
        )


def _files(root: Path) -> list[str]:
    return sorted(
        str(Path(d, f).relative_to(root))
        for d, _, fs in os.walk(root, followlinks=False)
        for f in fs
    )


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


ESCAPES = ["../../escaped", "../escaped", "state/../../escaped", "a//escaped", "a/./escaped"]


@pytest.mark.parametrize("key", ESCAPES)
def test_a_source_key_that_climbs_out_is_refused_before_anything_is_written(
    key: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    loop: LoopThread,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = make_store("memory", request, tmp_path)
    _save(store.url("run", "5"))
    store.raw_put(f"{store.path('run', '5')}/{key}", b"planted by an attacker")
    area = tmp_path / "area"
    dst = area / "copies" / "5"
    dst.parent.mkdir(parents=True)

    code, out, err = _cli(capsys, "cp", store.url("run", "5"), str(dst))

    assert code == 1, (out, err)
    line = err.strip().splitlines()[-1]
    assert "cloudckpt cp: error:" in line and repr(key) in line and "Nothing was written" in line
    assert _files(area) == []  # nothing inside the destination, nothing beside it
    assert not any("planted" in p.read_text(errors="ignore") for p in tmp_path.rglob("*escaped*"))


@pytest.mark.parametrize("kind", ["gcs", "memory"])
def test_a_climbing_key_copied_to_an_object_store_is_refused_too(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    loop: LoopThread,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = make_store("memory", request, tmp_path)
    dst = make_store(kind, request, tmp_path)
    _save(src.url("run", "5"))
    src.raw_put(f"{src.path('run', '5')}/../../escaped", b"planted")
    code, _, err = _cli(capsys, "cp", src.url("run", "5"), dst.url("copies", "5"))
    assert code == 1 and "'../../escaped'" in err

    async def everything() -> list[str]:
        return [info.path async for info in dst.backend.list_prefix(dst.root)]

    assert loop.run(everything()) == []


def test_a_symlink_in_a_local_source_is_refused_and_its_target_never_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text("[default]\naws_secret_access_key = NOT-FOR-UPLOAD-0123456789\n")
    src = tmp_path / "run" / "5"
    _save(str(src))
    os.symlink(secret, src / "README")
    os.symlink(secret.parent, src / "state" / "more")  # a linked directory, too
    dst = tmp_path / "copies" / "5"

    code, out, err = _cli(capsys, "cp", str(src), str(dst))

    assert code == 1, (out, err)
    line = err.strip().splitlines()[-1]
    assert (
        "symbolic links" in line and str(src / "README") in line and "Nothing was written" in line
    )
    assert not (tmp_path / "copies").exists() or _files(tmp_path / "copies") == []

    # Without the links the same step copies, verified.
    os.unlink(src / "README")
    os.unlink(src / "state" / "more")
    code, out, err = _cli(capsys, "cp", str(src), str(dst))
    assert code == 0, err
    assert not any("NOT-FOR-UPLOAD" in (dst / f).read_text(errors="ignore") for f in _files(dst))


def test_the_file_backend_never_lists_or_reads_a_symlink(tmp_path: Path, loop: LoopThread) -> None:
    backend = backends.get_backend("file")
    target = tmp_path / "outside.txt"
    target.write_bytes(b"outside")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "real").write_bytes(b"inside")
    os.symlink(target, root / "d" / "link")
    os.symlink(tmp_path, root / "d" / "dirlink")

    async def listing() -> list[str]:
        return sorted([info.path async for info in backend.list_prefix(str(root))])

    assert loop.run(listing()) == [str(root / "d" / "real")]
    assert loop.run(backend.symlinks_under(str(root))) == sorted(
        [str(root / "d" / "link"), str(root / "d" / "dirlink")]
    )
    with pytest.raises(OSError, match="symbolic link"):
        loop.run(backend.get(str(root / "d" / "link")))
    assert loop.run(backend.exists(str(root / "d" / "link"))) is False
    with pytest.raises(FileNotFoundError):
        loop.run(backend.stat(str(root / "d" / "link")))


@pytest.mark.parametrize("op", ["get", "put", "delete", "list"])
def test_the_file_backend_refuses_dot_segments(op: str, tmp_path: Path, loop: LoopThread) -> None:
    backend = backends.get_backend("file")
    (tmp_path / "a").mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    sneaky = f"{tmp_path}/a/../victim"
    calls = {
        "get": lambda: backend.get(sneaky),
        "put": lambda: backend.put(sneaky, b"overwritten"),
        "delete": lambda: backend.delete(sneaky),
        "list": lambda: _drain(backend.list_prefix(f"{tmp_path}/a/..")),
    }
    with pytest.raises(ValueError, match=r"'\.\.' segment"):
        loop.run(calls[op]())
    assert victim.read_bytes() == b"keep me"


async def _drain(it: object) -> list[object]:
    return [x async for x in it]  # type: ignore[attr-defined]
