"""A fork server for the suite's worker processes: JAX is imported once, each worker forked.

A worker started as ``python -m tests.X`` spends 1.6 s (quiet) to 3.6 s (loaded)
of CPU importing JAX, numpy, tensorstore, s3fs and gcsfs before it does
anything; the crash campaign alone starts 60, on 2 cores. The zygote, a
process started once per test session, imports them (without starting JAX's
backend: it runs no thread of its own, only OpenBLAS's idle ones, which
OpenBLAS handles at fork) and forks a child per worker. It does not import
cloudckpt (0.12 s), which refuses to run in a process forked from one that
loaded it. The child takes the worker's standard streams, working directory,
environment and arguments and runs its module as ``__main__``, as ``python
-m`` would; it exits as a Python process does (non-daemon threads joined,
``atexit`` run, streams flushed).

What a forked worker shares with the zygote is what was imported: nothing the
workers configure is read at import (endpoints, credentials and tensorstore's
stall bounds are read from the environment at first use), ``random`` is
reseeded at fork by Python, and every token cloudckpt makes comes from
``os.urandom``. JAX's backend starts in the child, so a worker may still set
its device count or join ``jax.distributed``; a worker that needs JAX's
environment variables read at import must start as a fresh interpreter.

``spawn`` answers a :class:`Child`, which quacks enough like ``subprocess.Popen``
(``stdin``/``stdout``/``stderr``, ``pid``, ``poll``, ``wait``, ``kill``,
``send_signal``, ``communicate``) for the tests that used one. Signals go through
a pidfd that the zygote opened at fork, closed only once the worker is reaped
and never while a signal is being sent, so a signal can never reach a process
that reused a reaped worker's pid (or a descriptor number reused for another).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
#: Enough for one request (an environment of a few KiB and the arguments).
_MESSAGE_BYTES = 1 << 20


class Child:
    """A worker forked by the zygote; ``rc`` arrives from the zygote when it reaps it."""

    def __init__(self, args: list[str], pid: int, pidfd: int | None, streams: dict[str, Any]):
        self.args = args
        self.pid = pid
        self._pidfd = pidfd
        self._pidfd_lock = threading.Lock()  # a signal and the close at reaping never overlap
        self.stdin: IO[str] | None = streams.get("stdin")
        self.stdout: IO[str] | None = streams.get("stdout")
        self.stderr: IO[str] | None = streams.get("stderr")
        self.returncode: int | None = None
        self._ended = threading.Event()

    def _reaped(self, rc: int) -> None:
        with self._pidfd_lock:
            self.returncode = rc
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signals the worker, unless it was reaped (then it is a no-op, as with Popen)."""
        with self._pidfd_lock:
            if self._pidfd is None:
                return
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Reads stdout and stderr to their ends (both at once: no pipe fills), then waits."""
        if self.stdin is not None:
            self.stdin.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        out: dict[int, list[bytes]] = {}
        with selectors.DefaultSelector() as sel:
            for stream in (self.stdout, self.stderr):
                if stream is not None:
                    sel.register(stream.fileno(), selectors.EVENT_READ)
                    out[stream.fileno()] = []
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        out[key.fd].append(chunk)
                    else:
                        sel.unregister(key.fd)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        texts = []
        for stream in (self.stdout, self.stderr):
            if stream is None:
                texts.append("")
                continue
            texts.append(b"".join(out[stream.fileno()]).decode("utf-8", "replace"))
            stream.close()
        return texts[0], texts[1]


class Zygote:
    """The test side: one zygote process, and a thread that hands its answers to children."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        # Its own errors go to a file of its own: the streams this process has now are
        # those pytest captures for the test that happens to start it.
        self._log = tempfile.TemporaryFile(  # noqa: SIM115 (the zygote's, for its lifetime)
            mode="w+", encoding="utf-8", errors="replace"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", str(theirs.fileno())],
            cwd=REPO,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        theirs.close()
        self._lock = threading.Lock()
        self._next = 0
        #: Per request: its arguments and our ends of its streams, until its pid comes.
        self._waiting: dict[int, tuple[list[str], dict[str, Any], Future[Child]]] = {}
        #: Children not yet reaped, by pid. A Child is made here, on the answering
        #: thread, when its pid arrives, so its exit status (which comes later on the
        #: same socket) always finds it.
        self._children: dict[int, Child] = {}
        self._reader = threading.Thread(target=self._read, name="zygote-answers", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._sock, _MESSAGE_BYTES, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                with self._lock:
                    for _, _, future in self._waiting.values():
                        future.set_exception(RuntimeError("the zygote ended"))
                    for child in self._children.values():
                        child._reaped(-signal.SIGKILL)
                return
            answer = json.loads(data)
            with self._lock:
                if "rc" in answer:
                    self._children.pop(answer["pid"])._reaped(answer["rc"])
                else:
                    args, streams, future = self._waiting.pop(answer["id"])
                    child = Child(args, answer["pid"], fds[0] if fds else None, streams)
                    self._children[child.pid] = child
                    future.set_result(child)

    def spawn(
        self,
        module: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | str = REPO,
        stdin: bool = True,
        stderr: IO[Any] | None = None,
        timeout: float = 60.0,
    ) -> Child:
        """Forks ``python -m module args``: pipes for stdin, stdout and (unless given) stderr."""
        mine: dict[str, Any] = {}
        given: list[int] = []
        try:
            if stdin:
                r, w = os.pipe()
                mine["stdin"] = open(w, "w", encoding="utf-8", buffering=1)  # noqa: SIM115
                given.append(r)
            else:
                given.append(os.open(os.devnull, os.O_RDONLY))
            r, w = os.pipe()
            mine["stdout"] = open(r, encoding="utf-8", errors="replace")  # noqa: SIM115
            given.append(w)
            if stderr is None:
                r, w = os.pipe()
                mine["stderr"] = open(r, encoding="utf-8", errors="replace")  # noqa: SIM115
                given.append(w)
            else:
                given.append(os.dup(stderr.fileno()))
            future: Future[Child] = Future()
            with self._lock:
                self._next += 1
                ident = self._next
                self._waiting[ident] = ([module, *args], mine, future)
                request = {
                    "id": ident,
                    "module": module,
                    "args": list(args),
                    "env": dict(os.environ if env is None else env),
                    "cwd": str(cwd),
                }
                socket.send_fds(self._sock, [json.dumps(request).encode()], given)
        finally:
            for fd in given:
                os.close(fd)
        try:
            return future.result(timeout)
        except (RuntimeError, TimeoutError) as exc:
            for stream in mine.values():
                stream.close()
            self._log.seek(0)
            raise RuntimeError(
                f"the zygote did not fork {module} ({exc!r}); its log: {self._log.read()[-3000:]}"
            ) from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(30)
        self._log.close()


_ZYGOTE: Zygote | None = None
_ZYGOTE_LOCK = threading.Lock()


def zygote() -> Zygote:
    """This process's zygote, started at first use and stopped at exit."""
    global _ZYGOTE
    with _ZYGOTE_LOCK:
        if _ZYGOTE is None:
            _ZYGOTE = Zygote()
            atexit.register(_ZYGOTE.close)
        return _ZYGOTE


def spawn(module: str, args: list[str], **kwargs: Any) -> Child:
    """``python -m module args``, forked from this process's zygote (see :meth:`Zygote.spawn`)."""
    return zygote().spawn(module, args, **kwargs)


def run(
    module: str, args: list[str], env: Mapping[str, str] | None = None, timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run([python, -m, module, *args], capture_output=True, text=True)``."""
    child = spawn(module, args, env=env, stdin=False)
    try:
        out, err = child.communicate(timeout)
    finally:
        child.kill()
    return subprocess.CompletedProcess(child.args, child.wait(60), out, err)


# --- the zygote process -------------------------------------------------------------------


def _preload() -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import aiobotocore.session  # noqa: F401
    import gcsfs  # noqa: F401
    import numpy  # noqa: F401
    import s3fs  # noqa: F401
    import tensorstore  # noqa: F401

    # Not cloudckpt (0.12 s of import): it refuses to run in a process forked from one
    # that loaded it (cloudckpt.engine.loop.check_not_forked).
    assert "cloudckpt" not in sys.modules


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the worker; never returns."""
    rc = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], *request["args"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            rc = 0
        except SystemExit as exc:
            rc = _exit_code(exc)
        except BaseException:
            traceback.print_exc()
            rc = 1
        threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter does at exit
        atexit._run_exitfuncs()
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(rc)


def _serve(sock: socket.socket) -> None:
    """Forks a child per request; reports each child's pid (with a pidfd) and, once reaped, rc."""
    running: set[int] = set()
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while True:
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    running.discard(pid)
                    rc = os.waitstatus_to_exitcode(status)
                    sock.sendall(json.dumps({"pid": pid, "rc": rc}).encode())
            if not sel.select(0.02):
                continue
            data, fds, _, _ = socket.recv_fds(sock, _MESSAGE_BYTES, 3)
            if not data:
                return
            request = json.loads(data)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sock.close()
                _child(request, fds)
            for fd in fds:
                os.close(fd)
            running.add(pid)
            pidfd = os.pidfd_open(pid)
            answer = json.dumps({"id": request["id"], "pid": pid}).encode()
            socket.send_fds(sock, [answer], [pidfd])
            os.close(pidfd)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    _preload()
    _serve(sock)


if __name__ == "__main__":
    main()
