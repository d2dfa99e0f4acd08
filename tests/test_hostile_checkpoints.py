"""Stored checkpoints are untrusted input: regression tests for issue 11 (items 3, 4, 6, 7, 8).

Each test forges a real checkpoint the way an attacker (or a broken writer)
could, re-wrapping JSON objects with a valid checksum so that the forgery
reaches the validation code, and asserts that cloudckpt refuses it with a
clear error naming the object, instead of following it, crashing the
interpreter or returning wrong bytes. The file backend is used because the
tests edit objects in place; the read paths are the same on every backend.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import cloudckpt as cc
from cloudckpt.format import jsonio as _jsonio
from cloudckpt.format import layout

from .hostile import leaf, manager, rewrap, run_cli, save_steps, state

ROOT_PKG = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ item 3: item names
@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint at ckpt/1 and, beside it, another run's private JSON item."""
    root = tmp_path / "ckpt"
    save_steps(str(root), (1,))
    secret = tmp_path / "private" / "run" / "7" / "secret"
    secret.mkdir(parents=True)
    (secret / "data.json").write_bytes(_jsonio.dumps({"password": "CANARY-7"}))
    return root, secret


def forge_item_name(root: Path, name: str) -> None:
    def change(meta: dict) -> None:
        meta["item_handlers"][name] = meta["item_handlers"].pop("meta")

    rewrap(root / "1" / "_CHECKPOINT_METADATA", change)


@pytest.mark.parametrize(
    "name",
    [
        "../../private/run/7/secret",  # reaches the planted item: 198b6a8 returned its JSON
        "../../../private/run/7/secret",
        "..",
        "/etc",
        "a/b",
        "_COMMITTED",
        ".hidden",
    ],
)
def test_item_names_read_from_storage_are_validated_on_every_read_path(
    planted: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    root, _ = planted
    forge_item_name(root, name)
    with manager(str(root)) as m:
        with pytest.raises(cc.CorruptCheckpointError, match="invalid item name"):
            m.restore(1)
        with pytest.raises(cc.CorruptCheckpointError, match="invalid item name"):
            m.metadata(1)
    for argv in (("inspect", "--json"), ("verify", "--json")):
        code, out, err = run_cli(*argv, str(root / "1"))
        assert code == 1 and "CANARY" not in out + err, (argv, out, err)
        assert "invalid item name" in out + err
    code, out, err = run_cli("cp", str(root / "1"), str(tmp_path / "copy" / "1"))
    assert code == 1 and "CANARY" not in out + err
    assert not (tmp_path / "copy" / "1").exists()


@pytest.mark.parametrize(
    ("leaf_path", "field", "value"),
    [
        ("['w']", "key", "../../../private/run/7/secret"),
        ("['w']", "key", "/etc/passwd"),
        ("['w']", "key", "arrays/1"),  # another leaf's array
        ("['b']", "obj", "../../private/run/7/secret/data.json"),
        ("['b']", "obj", "packs/00.0"),
    ],
)
def test_keys_inside_pytree_json_stay_inside_the_item(
    planted: tuple[Path, Path], leaf_path: str, field: str, value: str
) -> None:
    root, _ = planted

    def change(doc: dict) -> None:
        storage = leaf(doc, leaf_path)["storage"]
        if field == "key":
            storage["key"] = value
        else:
            storage["entries"][0][0] = value

    rewrap(root / "1" / "state" / "pytree.json", change)
    with manager(str(root)) as m:
        with pytest.raises(cc.CorruptCheckpointError, match=r"pytree\.json is corrupt"):
            m.restore(1)
        with pytest.raises(cc.CorruptCheckpointError):
            m.restore(1, args=cc.args.Composite(state=cc.args.StandardRestore(state(1))))
        assert m.metadata(1).item_metadata["state"] is None  # not describable, not fatal
    code, out, err = run_cli("inspect", str(root / "1"))
    assert code == 1 and "is corrupt" in err
    code, out, _ = run_cli("verify", "--json", str(root / "1"))
    assert code == 1 and "CANARY" not in out
    assert any(p["url"].endswith("state/pytree.json") for p in json.loads(out)["problems"])


# ------------------------------------------------------- item 4: sizes before allocating
def _in_subprocess(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter: an abort from C++ is a failure, not a dead pytest."""
    # The cloudckpt under test (whichever this process imported), and this tests package.
    path = os.pathsep.join([str(Path(cc.__file__).parents[1]), str(ROOT_PKG)])
    env = dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT_PKG),
    )


def forge_zarr_shape(root: Path, shape: list[int], chunk: list[int], dtype: str = "uint8") -> None:
    def change(doc: dict) -> None:
        record = leaf(doc, "['w']")
        record["shape"], record["dtype"] = shape, dtype
        record["storage"]["metadata"] = layout.zarr_metadata(
            tuple(shape), np.dtype(dtype), chunk, chunk
        )

    rewrap(root / "1" / "state" / "pytree.json", change)


RESTORE_ALL = """
    import sys
    import cloudckpt as cc
    from tests.hostile import manager, run_cli
    with manager(sys.argv[1] if len(sys.argv) > 1 else {root!r}) as m:
        for call in (lambda: m.restore(1),
                     lambda: m.restore(1, args=cc.args.Composite(
                         state=cc.args.StandardRestore(m.metadata(1).item_metadata["state"])))):
            try:
                call()
                print("RESTORED")
            except cc.CorruptCheckpointError as exc:
                print("REFUSED", " ".join(str(exc).split()))
    code, out, err = run_cli("verify", {step!r})
    print("VERIFY", code, " ".join(err.split())[-300:])
"""


@pytest.mark.parametrize(
    ("shape", "chunk", "dtype"),
    [
        ([1 << 20, 1 << 20], [1 << 20, 1 << 20], "uint8"),  # aborted the interpreter (bad_alloc)
        ([10**9], [1], "uint8"),  # a chunk grid of 10^9: verify grew without bound
        ([1 << 40, 8], [1 << 38, 8], "float64"),
    ],
)
def test_a_crafted_zarr_shape_is_refused_before_allocating(
    tmp_path: Path, shape: list[int], chunk: list[int], dtype: str
) -> None:
    root = tmp_path / "ckpt"
    save_steps(str(root), (1,))
    forge_zarr_shape(root, shape, chunk, dtype)
    done = _in_subprocess(RESTORE_ALL.format(root=str(root), step=str(root / "1")))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["REFUSED", "REFUSED", "VERIFY"], lines
    assert "['w']" in lines[0] and "arrays/0" in lines[0]
    assert "chunks but" in lines[0] or "its metadata implies" in lines[0]
    assert lines[2].startswith("VERIFY 1")


def test_a_crafted_packed_shape_is_refused_before_allocating(tmp_path: Path) -> None:
    """A packed leaf claiming 32 TiB: its entry must lie within the pack object's real size."""
    root = tmp_path / "ckpt"
    save_steps(str(root), (1,))
    n = 1 << 22

    def change(doc: dict) -> None:
        record = leaf(doc, "['b']")
        record["shape"] = [n, 1 << 20]
        entry = record["storage"]["entries"][0]
        entry[2], entry[3] = n * (1 << 20) * 8, [[0, n], [0, 1 << 20]]
        # Keep the other entries of the pack object back to back after it.
        for other in doc["leaves"]:
            for e in other.get("storage", {}).get("entries", []):
                if e is not entry and e[0] == entry[0] and e[1] > entry[1]:
                    e[1] += entry[2] - 80

    rewrap(root / "1" / "state" / "pytree.json", change)
    done = _in_subprocess(RESTORE_ALL.format(root=str(root), step=str(root / "1")))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["REFUSED", "REFUSED", "VERIFY"], lines
    assert "packs/0.0" in lines[0] and "its entries need exactly" in lines[0]
    assert lines[2].startswith("VERIFY 1")


# ---------------------------------------------------------------- item 6: byte order
NUMERIC = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]
ML_DTYPES = [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.int4, ml_dtypes.uint4]


def _values(dtype: np.dtype, n: int) -> np.ndarray:
    base = np.arange(n) % 7 - 3
    if dtype.kind == "b":
        return (base > 0).astype(dtype)
    if dtype.kind == "u":
        return (np.arange(n) % 13).astype(dtype)
    if dtype.kind == "c":
        return (base * 1.5 + 0.25j * base).astype(dtype)
    return (
        (base * 1.5).astype(dtype)
        if dtype.kind == "f" or "float" in dtype.name
        else base.astype(dtype)
    )


def _variants(dtype: np.dtype, n: int) -> dict[str, np.ndarray]:
    """The same values in both byte orders and several memory layouts."""
    values = _values(dtype, n * 4).reshape(2 * n, 2)
    out = {"native": values[:n].copy()}
    if dtype.itemsize > 1 and dtype.kind in "iufc":
        swapped = dtype.newbyteorder(">" if np.little_endian else "<")
        out["other_order"] = values[:n].astype(swapped)
        out["other_order_fortran"] = np.asfortranarray(values[:n].astype(swapped))
    out["fortran"] = np.asfortranarray(values[:n])
    out["strided"] = values[::2]
    out["negative"] = values[::-2]
    out["transposed"] = values[:n].T
    return out


@pytest.mark.parametrize("size", ["packed", "zarr"])
def test_every_dtype_in_both_byte_orders_and_any_layout_restores_exactly(
    tmp_path: Path, size: str
) -> None:
    n = 8 if size == "packed" else 600  # 600 x 2 elements: above the 1 KiB pack threshold
    tree = {}
    for dtype in [np.dtype(t) for t in NUMERIC + ML_DTYPES]:
        for name, value in _variants(dtype, n).items():
            tree[f"{dtype.name}-{name}"] = value
    tree["scalar_be"] = np.array(2.5, ">f8")[()]
    tree["zero_d_be"] = np.array(-7, ">i4")
    with manager(str(tmp_path / "ckpt")) as m:
        m.save(1, args=cc.args.Composite(state=cc.args.StandardSave(tree)))
        restored = m.restore(1)["state"]
        targeted = m.restore(
            1,
            args=cc.args.Composite(
                state=cc.args.StandardRestore(
                    {
                        k: np.zeros(np.shape(v), np.asarray(v).dtype.newbyteorder("="))
                        for k, v in tree.items()
                    }
                )
            ),
        )["state"]
    kinds = {
        leaf["storage"]["type"]
        for leaf in json.loads((tmp_path / "ckpt/1/state/pytree.json").read_bytes())["data"][
            "leaves"
        ]
    }
    assert size in kinds
    for key, value in tree.items():
        expected = np.asarray(value)
        for got in (restored[key], targeted[key]):
            got = np.asarray(got)
            assert got.shape == expected.shape, key
            assert got.dtype == expected.dtype.newbyteorder("="), key
            assert got.tobytes() == expected.astype(got.dtype).tobytes(), key
            if expected.dtype.kind in "iufcb":
                np.testing.assert_array_equal(got, expected, err_msg=key)
    code, _, err = run_cli("verify", str(tmp_path / "ckpt" / "1"))
    assert code == 0, err


def test_the_documented_example_restores_its_values(tmp_path: Path) -> None:
    value = (np.arange(6) * 1.5).astype(">f4")
    with manager(str(tmp_path)) as m:
        m.save(1, args=cc.args.Composite(state=cc.args.StandardSave({"x": value})))
        np.testing.assert_array_equal(m.restore(1)["state"]["x"], [0, 1.5, 3, 4.5, 6, 7.5])


# ---------------------------------------------------------- item 7: entries tile exactly
def forge_overlap(root: Path) -> None:
    """Leaf ['b'] (10 float64) as two entries [0,5) and [4,9), each with a valid crc32c."""
    doc_path = root / "1" / "state" / "pytree.json"
    doc = _jsonio.loads(doc_path.read_bytes(), where="x")
    name = leaf(doc, "['b']")["storage"]["entries"][0][0]  # @<attempt>/packs/0.0
    pack = root / "1" / "state" / name
    old = pack.read_bytes()
    values = state(1)["b"]
    first, second = values[0:5].tobytes(), values[4:9].tobytes()
    head = first + layout.entry_crc(first) + second + layout.entry_crc(second)
    entry = leaf(doc, "['b']")["storage"]["entries"][0]
    start, end = entry[1], entry[1] + entry[2] + layout.CRC_BYTES
    shift = len(head) - (end - start)
    pack.write_bytes(old[:start] + head + old[end:])
    leaf(doc, "['b']")["storage"]["entries"] = [
        [name, start, 40, [[0, 5]]],
        [name, start + 44, 40, [[4, 9]]],
    ]
    for record in doc["leaves"]:
        for e in record.get("storage", {}).get("entries", []):
            if e[0] == name and e[1] > start and record["path"] != "['b']":
                e[1] += shift
    doc_path.write_bytes(_jsonio.dumps(doc))


def test_overlapping_pack_entries_are_refused_by_restore_and_verify(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_steps(str(root), (1,))
    forge_overlap(root)
    with manager(str(root)) as m:
        with pytest.raises(cc.CorruptCheckpointError, match="overlap or leave part"):
            m.restore(1)
        with pytest.raises(cc.CorruptCheckpointError, match="overlap or leave part"):
            m.restore(1, args=cc.args.Composite(state=cc.args.StandardRestore(state(1))))
    code, out, _ = run_cli("verify", "--json", str(root / "1"))
    assert code == 1
    assert any("overlap or leave part" in p["detail"] for p in json.loads(out)["problems"])


def test_a_gap_between_pack_entries_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_steps(str(root), (1,))

    def change(doc: dict) -> None:
        leaf(doc, "['b']")["storage"]["entries"][0][1] += 4

    rewrap(root / "1" / "state" / "pytree.json", change)
    with (
        manager(str(root)) as m,
        pytest.raises(cc.CorruptCheckpointError, match="leaves a gap after"),
    ):
        m.restore(1)
    assert run_cli("verify", str(root / "1"))[0] == 1


# -------------------------------------------------------------- item 8: step names
def _clone_step(root: Path, src: str, name: str) -> None:
    shutil.copytree(root / src, root / name)


def test_only_canonical_step_names_are_steps(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    save_steps(str(root), (1, 2, 7))
    for name in ("00000007", "²", "٣", "7 ", "+7", "9" * 200, "1_2"):
        _clone_step(root, "7", name)
    with manager(str(root), max_to_keep=2) as m:
        assert m.all_steps() == [1, 2, 7]
        assert m.latest_step() == 7
        np.testing.assert_array_equal(m.restore(7)["state"]["b"], state(7)["b"])
        m.save(8, args=cc.args.Composite(state=cc.args.StandardSave(state(8))))
        m.wait_until_finished()  # retention runs in the background
        assert m.all_steps() == [7, 8]
    left = {p.name for p in root.iterdir()}
    assert {"00000007", "²", "٣", "7 ", "+7", "9" * 200, "1_2"} <= left  # never deleted
    code, out, err = run_cli("ls", "--json", str(root))
    assert code == 0, err
    names = [row["name"] for row in json.loads(out)]
    assert "7" in names and "²" in names
    with manager(str(root), step_format_fixed_length=8) as m:
        assert m.all_steps() == [7]  # only "00000007" has the fixed length
    with manager(str(root), step_prefix="ckpt") as m:
        assert m.all_steps() == []


# ------------------------------------------------- mutations the fuzz campaign found
#: (object, JSON path in its payload, value): each crashed a read path (IndexError or
#: AttributeError from deep inside the handler, an ``internal error`` from the CLI) or
#: returned wrong metadata on 198b6a8; the last one broke the first validator itself.
FOUND_BY_FUZZ = [
    ("state/pytree.json", ("leaves", 1, "shape", 0), 1 << 62),  # IndexError in restore
    ("state/pytree.json", ("leaves", 6, "shape"), {"x": []}),  # metadata() shape ('x',)
    ("state/pytree.json", ("leaves", 7, "storage"), [[[0]]]),  # AttributeError in restore
    ("state/pytree.json", ("leaves", 0, "storage", "metadata", "chunk_grid"), 1),  # inspect
    ("state/pytree.json", ("leaves", 8), "NaN"),  # a leaf record that is not an object
    ("state/pytree.json", ("leaves", 0, "kind"), [[0]]),  # TypeError: unhashable 'list'
    ("state/pytree.json", ("leaves", 5, "py_type"), {"int": 1}),
    ("_CHECKPOINT_METADATA", ("item_handlers",), 1.5),
    ("_CHECKPOINT_METADATA", ("metrics",), [[[[0]]]]),
]


@pytest.mark.parametrize(("rel", "path", "value"), FOUND_BY_FUZZ)
def test_mutations_found_by_fuzzing_are_refused_cleanly(
    tmp_path: Path, rel: str, path: tuple, value: object
) -> None:
    root = tmp_path / "ckpt"
    save_steps(str(root), (1,))

    def change(payload: dict) -> None:
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value

    rewrap(root / "1" / rel, change)
    with manager(str(root)) as m:
        with pytest.raises(cc.CorruptCheckpointError, match="is corrupt"):
            m.restore(1)
        with pytest.raises(cc.CorruptCheckpointError, match="is corrupt"):
            m.restore(1, args=cc.args.Composite(state=cc.args.StandardRestore(state(1))))
        try:
            described = m.metadata(1).item_metadata["state"]
        except cc.CorruptCheckpointError:
            described = None
        assert described is None  # refused, or not describable: never a wrong shape
    for argv in (("inspect",), ("verify",), ("cp",)):
        extra = (str(tmp_path / "copy" / "1"),) if argv == ("cp",) else ()
        code, out, err = run_cli(*argv, str(root / "1"), *extra)
        assert code == 1 and "internal error" not in err and "is corrupt" in out + err, err
