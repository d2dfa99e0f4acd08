"""``file://`` and plain paths: the POSIX file system, with atomic rename.

Objects are files; writes go to a unique temporary file that is renamed into
place (``put``) or hard-linked into place (``put_if_absent``: ``link``
fails when the name exists, so creation is atomic and all-or-nothing).
Blocking calls run in the default executor.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import uuid
from typing import Any

from atomicity import ObjectInfo
from cloudckpt.backends.base import Backend

_PARTIAL = ".cloudckpt-partial-"


def _write_new_file(path: str, data: bytes) -> str:
    """Writes ``data`` durably to a fresh temporary file beside ``path``."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f"{_PARTIAL}{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put(path: str, data: bytes) -> None:
    tmp = _write_new_file(path, data)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _create(path: str, data: bytes) -> None:
    tmp = _write_new_file(path, data)
    try:
        os.link(tmp, path)  # atomic, fails with EEXIST when taken
    finally:
        os.unlink(tmp)
    _fsync_dir(os.path.dirname(path))


def _get(path: str, byte_range: tuple[int, int] | None) -> bytes | None:
    try:
        with open(path, "rb") as f:
            if byte_range is None:
                return f.read()
            start, end = byte_range
            f.seek(start)
            return f.read(end - start)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def _stat(path: str) -> ObjectInfo:
    st = os.stat(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file")
    return ObjectInfo(path, st.st_size, st.st_mtime)


def _list(prefix: str) -> list[ObjectInfo]:
    out = []
    for dirpath, _dirs, files in os.walk(prefix):
        for name in files:
            if name.startswith(_PARTIAL):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            out.append(ObjectInfo(full, st.st_size, st.st_mtime))
    return out


def _delete_many(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _rmtree(prefix: str) -> None:
    shutil.rmtree(prefix, ignore_errors=True)


def _rename(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"cannot rename {src}: it does not exist")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        # rename(2) replaces an empty directory; refuse that too.
        if os.path.lexists(dst):
            raise FileExistsError(dst)
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"cannot rename {src} to {dst}: the destination exists") from None
        raise


class FileBackend(Backend):
    """The local (or network-mounted POSIX) file system."""

    scheme = "file"

    @property
    def supports_atomic_rename(self) -> bool:
        return True

    def url(self, path: str) -> str:
        return path

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "file", "path": path.rstrip("/") + "/"}

    def _tensorstore_context_spec(self) -> dict[str, Any]:
        return {"file_io_concurrency": {"limit": 32}}

    async def _get(self, path: str, byte_range: tuple[int, int] | None) -> bytes | None:
        return await asyncio.to_thread(_get, path, byte_range)

    async def _put(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(_put, path, data)

    async def _create(self, path: str, data: bytes, token: str) -> None:
        await asyncio.to_thread(_create, path, data)

    async def _exists(self, path: str) -> bool:
        return await asyncio.to_thread(os.path.isfile, path)

    async def _stat(self, path: str) -> ObjectInfo:
        return await asyncio.to_thread(_stat, path)

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        return await asyncio.to_thread(_list, prefix)

    async def _delete_many(self, paths: list[str]) -> None:
        await asyncio.to_thread(_delete_many, paths)

    async def delete_prefix(self, prefix: str) -> None:
        # One rmtree; unlike object stores, nothing here relies on deletion order
        # (checkpoints are renamed to a temporary name before being deleted).
        prefix = prefix.rstrip("/")
        await self._retrying("delete_prefix", prefix, lambda: asyncio.to_thread(_rmtree, prefix))

    async def rename(self, src: str, dst: str) -> None:
        await self._retrying("rename", src, lambda: asyncio.to_thread(_rename, src, dst))
