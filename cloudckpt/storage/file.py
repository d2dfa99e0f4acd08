"""``file://`` and plain paths: the POSIX file system, with atomic rename.

Objects are files; writes go to a unique temporary file that is renamed into
place (``put``) or hard-linked into place (``put_if_absent``: ``link``
fails when the name exists, so creation is atomic and all-or-nothing).
Blocking calls run in the default executor.

Paths are used exactly as given: nothing is globbed or expanded. A
checkpoint holds only regular files and directories, so symbolic links
inside a listed tree are never listed and never read (a link named like an
object of a checkpoint could otherwise make a copy upload ``~/.aws/credentials``);
``symlinks_under`` names them for a caller that must refuse them. Links above
the listed prefix (a root on a symlinked mount) are followed as usual.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import stat
import uuid
from typing import Any

from atomicity import ObjectInfo, Versioned
from cloudckpt.storage._stream import Buffer, Sink
from cloudckpt.storage.base import Backend

_PARTIAL = ".cloudckpt-partial-"


def _checked(path: str) -> str:
    """``path`` itself, refused when a ``.`` or ``..`` segment would move it elsewhere.

    Paths reach this backend absolute and normalised (``split_url``); a dot
    segment means an untrusted name was joined onto one, so nothing is read,
    written or deleted there.
    """
    if any(segment in (".", "..") for segment in path.split("/")) or "\0" in path:
        raise ValueError(
            f"refusing the path {path!r}: it has a '.' or '..' segment (or a NUL byte), so it "
            "does not name what it appears to; object and item names must not contain them"
        )
    return path


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


def _link_error(path: str) -> OSError:
    return OSError(
        errno.ELOOP,
        f"{path} is a symbolic link; a checkpoint holds only regular files and cloudckpt "
        "never follows links inside one. Replace the link with the file it points to, or "
        "remove it",
    )


def _version_of(st: os.stat_result) -> str:
    # Every write makes a new inode (write a fresh file, then link or rename it),
    # and the mtime in ns guards against an inode number being reused.
    return f"{st.st_ino}.{st.st_mtime_ns}.{st.st_size}"


def _get_versioned(path: str) -> Versioned | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return Versioned(f.read(), _version_of(st), st.st_mtime)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


class _Locked:
    """The file at ``path``, locked with flock(2) and still the one the name points to.

    Every conditional change of an object takes this lock on the inode it
    judges, so two changers of one version are serialised and the second sees
    that the name now points elsewhere.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.version: str | None = None

    def __enter__(self) -> _Locked:
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return self
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        st = os.fstat(self.fd)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return self
        if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            self.version = _version_of(st)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock


def _put_versioned(path: str, data: bytes, if_version: str | None) -> str | None:
    if if_version is None:
        try:
            _create(path, data)
        except FileExistsError:
            return None
        return _version_of(os.stat(path))
    with _Locked(path) as locked:
        if locked.version != if_version:
            return None
        tmp = _write_new_file(path, data)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
        return _version_of(os.stat(path))


def _delete_versioned(path: str, version: str) -> bool:
    with _Locked(path) as locked:
        if locked.version != version:
            return False
        os.unlink(path)
        _fsync_dir(os.path.dirname(path))
        return True


def _open_object(path: str) -> int | None:
    """A read-only descriptor of the object at ``path``; None when there is none.

    O_NOFOLLOW: a link in place of an object is refused, not followed.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(path) from None
        raise


def _get(path: str, byte_range: tuple[int, int] | None) -> bytes | None:
    fd = _open_object(path)
    if fd is None:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory: fdopen would refuse it
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        if byte_range is None:
            return f.read()
        start, end = byte_range
        f.seek(start)
        return f.read(end - start)


#: The bounce buffer a sink's bytes pass through (per read: bounded, whatever the sink's size).
_BOUNCE_BYTES = 1 << 20
#: preadv(2) takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024


def _read_into(path: str, offset: int, buffers: list[Buffer]) -> int | None:
    """preadv(2) of ``path`` from ``offset`` into ``buffers``; bytes read, None if absent.

    The kernel copies straight into the caller's flat buffers (no temporary),
    and the sequential hint lets read-ahead run ahead of the next call. A
    sink's bytes go through a bounce buffer of at most ``_BOUNCE_BYTES``.
    """
    fd = _open_object(path)
    if fd is None:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        want = sum(b.nbytes for b in buffers)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, want, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        bounce: memoryview | None = None
        for group in _groups(buffers):
            if isinstance(group, list):
                size = sum(b.nbytes for b in group)
                got = _preadv_all(fd, group, offset + done)
            else:
                size = group.nbytes
                if bounce is None:
                    bounce = memoryview(bytearray(min(_BOUNCE_BYTES, size)))
                got = _read_sink(fd, group, offset + done, bounce)
            done += got
            if got < size:
                break  # end of file: the caller reports the object as truncated
        return done
    finally:
        os.close(fd)


def _groups(buffers: list[Buffer]) -> list[list[memoryview] | Sink]:
    """``buffers`` as runs of flat views (one preadv each) and single sinks."""
    out: list[list[memoryview] | Sink] = []
    for b in buffers:
        if isinstance(b, memoryview):
            if out and isinstance(out[-1], list):
                out[-1].append(b)
            else:
                out.append([b])
        else:
            out.append(b)
    return out


def _preadv_all(fd: int, buffers: list[memoryview], offset: int) -> int:
    """Fills ``buffers`` from ``offset`` (fewer bytes only at the end of the file)."""
    want = sum(b.nbytes for b in buffers)
    done = 0
    while done < want:
        n = os.preadv(fd, _after(buffers, done)[:_IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
    return done


def _read_sink(fd: int, sink: Sink, offset: int, bounce: memoryview) -> int:
    """Feeds ``sink`` its bytes from ``offset``, a bounce buffer at a time."""
    done = 0
    while done < sink.nbytes:
        n = os.preadv(fd, [bounce[: min(len(bounce), sink.nbytes - done)]], offset + done)
        if n == 0:
            break
        sink.write(done, bounce[:n])
        done += n
    return done


def _after(buffers: list[memoryview], skip: int) -> list[memoryview]:
    """``buffers`` without their first ``skip`` bytes (to resume a short preadv)."""
    out = []
    for b in buffers:
        if skip >= b.nbytes:
            skip -= b.nbytes
            continue
        out.append(b[skip:])
        skip = 0
    return out


def _regular(path: str) -> os.stat_result | None:
    """lstat of ``path`` when it is a regular file (not a link, not a directory)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _stat(path: str) -> ObjectInfo:
    st = _regular(path)
    if st is None:
        raise FileNotFoundError(f"{path} is not a file")
    return ObjectInfo(path, st.st_size, st.st_mtime)


def _exists(path: str) -> bool:
    return _regular(path) is not None


def _walk(prefix: str) -> tuple[list[ObjectInfo], list[str]]:
    """Regular files under ``prefix`` and the symbolic links found there (not followed)."""
    files: list[ObjectInfo] = []
    links: list[str] = []
    # os.walk never descends into a linked directory; links are sorted out below.
    for dirpath, dirs, names in os.walk(prefix):
        for name in dirs:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                links.append(full)
        for name in names:
            if name.startswith(_PARTIAL):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                links.append(full)
            elif stat.S_ISREG(st.st_mode):
                files.append(ObjectInfo(full, st.st_size, st.st_mtime))
    return files, links


def _list(prefix: str) -> list[ObjectInfo]:
    return _walk(prefix)[0]


def _children(prefix: str) -> list[str]:
    """Non-empty real directories directly under ``prefix`` (links are not followed).

    An empty directory holds no object, so an object store would list no
    prefix for it: it is not a child here either. One ``scandir`` of
    ``prefix`` and one per child (stopping at its first entry).
    """
    try:
        entries = list(os.scandir(prefix))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            with os.scandir(entry.path) as inside:
                # A write in progress (a partial file not yet linked in) is not an object.
                if any(not e.name.startswith(_PARTIAL) for e in inside):
                    out.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return out


def _delete_many(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _rmtree(prefix: str) -> None:
    shutil.rmtree(prefix, ignore_errors=True)


def _rename(src: str, dst: str, claim_version: str | None = None) -> None:
    if claim_version is None:
        _rename_now(src, dst)
        return
    # Conditional on the claim inside ``src``: checked and renamed under the flock(2)
    # every conditional change of that claim takes, so a renewal (which replaces the
    # claim's inode under the same lock) either happened before the check, and the
    # rename is refused, or waits until the directory has moved and then fails itself.
    with _Locked(os.path.join(src, "_CLAIM")) as locked:
        if locked.version != claim_version:
            raise FileNotFoundError(
                f"not renaming {src}: its claim is no longer the version judged (renewed, "
                "replaced or removed since)"
            )
        _rename_now(src, dst)


def _rename_now(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"cannot rename {src}: it does not exist")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        # rename(2) replaces an empty directory; refuse that too.
        if os.path.lexists(dst):
            raise FileExistsError(dst)
        os.rename(src, dst)
        # The commit point of a step: make the new name durable before anyone
        # is told the step is committed (both parents, when they differ).
        _fsync_dir(os.path.dirname(dst))
        if os.path.dirname(src) != os.path.dirname(dst):
            _fsync_dir(os.path.dirname(src))
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
        return await asyncio.to_thread(_get, _checked(path), byte_range)

    async def _put(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(_put, _checked(path), data)

    async def _create(self, path: str, data: bytes, token: str) -> None:
        await asyncio.to_thread(_create, _checked(path), data)

    @property
    def supports_conditional_delete(self) -> bool:
        return True

    async def read_into(self, path: str, offset: int, buffers: list[Buffer]) -> int | None:
        """Reads ``path`` from ``offset`` straight into ``buffers`` (flat byte views or sinks).

        Returns the bytes read (fewer than the buffers hold at the end of the
        file), or None when there is no such regular file. Restores use it to
        place chunk data in the arrays handed to devices without a temporary.
        """
        return await asyncio.to_thread(_read_into, _checked(path), offset, buffers)

    async def _get_versioned(self, path: str) -> Versioned | None:
        return await asyncio.to_thread(_get_versioned, _checked(path))

    async def _put_versioned(self, path: str, data: bytes, if_version: str | None) -> str | None:
        return await asyncio.to_thread(_put_versioned, _checked(path), data, if_version)

    async def _delete_versioned(self, path: str, version: str) -> bool:
        return await asyncio.to_thread(_delete_versioned, _checked(path), version)

    async def _exists(self, path: str) -> bool:
        return await asyncio.to_thread(_exists, _checked(path))

    async def _stat(self, path: str) -> ObjectInfo:
        return await asyncio.to_thread(_stat, _checked(path))

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        return await asyncio.to_thread(_list, _checked(prefix))

    async def _list_children(self, prefix: str) -> list[str]:
        return await asyncio.to_thread(_children, _checked(prefix))

    async def _delete_many(self, paths: list[str]) -> None:
        await asyncio.to_thread(_delete_many, [_checked(p) for p in paths])

    async def symlinks_under(self, prefix: str) -> list[str]:
        links = await asyncio.to_thread(_walk, _checked(prefix.rstrip("/")))
        return sorted(links[1])

    async def delete_prefix(self, prefix: str) -> None:
        # One rmtree; unlike object stores, nothing here relies on deletion order
        # (checkpoints are renamed to a temporary name before being deleted).
        prefix = _checked(prefix.rstrip("/"))
        self._check_writable("delete", prefix)
        await self._retrying("delete_prefix", prefix, lambda: asyncio.to_thread(_rmtree, prefix))

    async def rename(self, src: str, dst: str, *, claim_version: str | None = None) -> None:
        src, dst = _checked(src), _checked(dst)
        self._check_writable("rename", src)
        await self._retrying(
            "rename", src, lambda: asyncio.to_thread(_rename, src, dst, claim_version)
        )
