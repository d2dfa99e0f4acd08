"""No credential reaches stdout, stderr, logs, error reprs or ``--json`` output.

Every CLI command runs with ``--debug`` (which switches botocore's DEBUG log
on: it prints request headers such as ``X-Amz-Security-Token`` and
``Authorization``), through its success path against SeaweedFS with the
harness's keys, and through its error path with recognisably fake keys and a
fake session token (SeaweedFS answers 403 to those, but every request still
carries them). Everything printed, every log record and every exception text
is scanned for the secrets and for the credential-bearing header values.
Most runs are in-process (``cloudckpt.cli.main``, output and log records
captured); one runs ``python -m cloudckpt`` so the handler the CLI installs
itself is covered too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

import atomicity
import cloudckpt as cc
from cloudckpt import storage as backends
from cloudckpt.cli import main
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage.redact import redact
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique

REPO = Path(__file__).resolve().parents[1]

FAKE_KEY_ID = "AKIAFAKEKEYID0123456"
FAKE_SECRET = "FAKEsecretACCESSkey0123456789abcdefXYZ"
FAKE_TOKEN = "FAKEsessionTOKEN//////////wEaDFAKEFAKE0123456789+abc="
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    "AWS_SESSION_TOKEN": FAKE_TOKEN,
}
#: Things that must never be printed: the secrets, and values of credential headers.
#: The local S3 server's own secret, made up when it starts, joins them (below).
NEVER = [FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN, "AWS4-HMAC-SHA256 Credential"]


@pytest.fixture(autouse=True, scope="module")
def _never_the_servers_secret(servers: LocalServers) -> None:
    if servers.s3.credentials.secret_key not in NEVER:
        NEVER.append(servers.s3.credentials.secret_key)


def _assert_clean(where: str, text: str) -> None:
    for secret in NEVER:
        assert secret not in text, f"{secret!r} leaked into {where}:\n{text[:3000]}"


def _save(url: str) -> None:
    tree = {"w": np.arange(4096, dtype=np.float32), "b": np.ones(4, np.float32)}
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(url, args=cc.args.Composite(state=cc.args.StandardSave(tree)))


class Run:
    """Runs the CLI in-process with --debug, collecting everything it printed and logged."""

    def __init__(self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture):
        self.capsys, self.caplog = capsys, caplog
        self.debug_records = 0

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        self.caplog.clear()
        with self.caplog.at_level(logging.DEBUG):
            code = main(["--debug", *argv])
        out, err = self.capsys.readouterr()
        logs = "\n".join(
            self.caplog.text.splitlines() + [r.getMessage() for r in self.caplog.records]
        )
        self.debug_records += sum(r.name.startswith("botocore") for r in self.caplog.records)
        for where, text in (("stdout", out), ("stderr", err), ("logs", logs)):
            _assert_clean(f"{where} of cloudckpt {' '.join(argv)}", text)
        return code, out, err


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Run:
    return Run(capsys, caplog)


def test_every_command_succeeds_without_printing_credentials(
    servers: LocalServers, run: Run, loop: LoopThread, tmp_path: Path
) -> None:
    root = f"s3://{BUCKET}/{unique('secrets')}"
    _save(f"{root}/1")
    _save(f"{root}/2")
    backend, path = backends.resolve(root)
    tmp = backend.default_temporary_path_class().from_final(f"{path}/3", backend, grace_s=0)
    loop.run(tmp.create())  # an abandoned save for gc

    for argv in (
        ["ls", "--all", root],
        ["inspect", f"{root}/1"],
        ["verify", f"{root}/1"],
        ["cp", f"{root}/1", f"{root}/copy"],
        ["cp", f"{root}/1", str(tmp_path / "local" / "1")],
        ["cp", str(tmp_path / "local" / "1"), f"{root}/back"],
        ["gc", "--yes", root],
        ["rm", "--yes", f"{root}/2"],
        ["doctor", f"{root}/doctor"],
    ):
        for json_flag in ([], ["--json"]):
            if json_flag and argv[0] in ("cp", "gc", "rm"):
                continue  # done once: they change the bucket
            code, out, err = run(*argv[:1], *json_flag, *argv[1:])
            assert code == 0, (argv, out, err)
    assert run.debug_records > 0  # botocore's DEBUG log really was on
    assert loop.run(atomicity.is_committed(backend, f"{path}/back"))


def test_every_error_path_keeps_fake_credentials_out(
    servers: LocalServers,
    run: Run,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    root = f"s3://{BUCKET}/{unique('secrets')}"
    _save(f"{root}/1")
    local = tmp_path / "local" / "1"
    _save(str(local))
    for name, value in FAKE_ENV.items():
        monkeypatch.setenv(name, value)

    for argv in (
        ["ls", root],
        ["ls", "--all", "--json", root],
        ["inspect", f"{root}/1"],
        ["inspect", "--json", f"{root}/1"],
        ["verify", f"{root}/1"],
        ["verify", "--json", f"{root}/1"],
        ["gc", "--yes", root],
        ["rm", "--yes", f"{root}/1"],
        ["cp", f"{root}/1", str(tmp_path / "copy")],
        ["cp", str(local), f"{root}/2"],
        ["doctor", root],
        ["doctor", "--json", root],
    ):
        code, out, err = run(*argv)
        assert code == 1, (argv, out, err)
        assert "access denied" in err or "FAIL" in out or '"fail"' in out.lower(), (argv, out, err)
        assert "credentials: env, access key id ...3456" in err + out, (argv, out, err)
    assert run.debug_records > 0


def test_error_reprs_and_tracebacks_hold_no_credentials(
    servers: LocalServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = f"s3://{BUCKET}/{unique('secrets')}"
    _save(f"{root}/1")
    for name, value in FAKE_ENV.items():
        monkeypatch.setenv(name, value)
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        with pytest.raises(PermissionError) as info:
            ckptr.restore(f"{root}/1")
        with pytest.raises(PermissionError) as info2:
            ckptr.save(
                f"{root}/2",
                args=cc.args.Composite(state=cc.args.StandardSave({"a": np.ones(3)})),
            )
    for exc in (info.value, info2.value):
        chain = "".join(traceback.format_exception(exc))
        texts = [repr(exc), str(exc), chain]
        cause: BaseException | None = exc
        while cause is not None:
            texts.append(repr(cause))
            cause = cause.__cause__ or cause.__context__
        _assert_clean("an exception", "\n".join(texts))


def test_the_debug_handler_of_a_real_process_redacts(servers: LocalServers, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(servers.env)
    env.update(FAKE_ENV)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "--debug", "ls", f"s3://{BUCKET}/{unique('x')}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "botocore" in proc.stderr and "X-Amz-Security-Token" in proc.stderr  # logs were on
    _assert_clean("stderr of python -m cloudckpt --debug", proc.stderr + proc.stdout)


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        (
            "headers={'X-Amz-Security-Token': b'FQoGZXIvYXdz', 'Authorization': "
            "b'AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/2026/s3, Signature=ab12'}",
            ["X-Amz-Security-Token", "Authorization"],
            ["FQoGZXIvYXdz", "Signature=ab12", "IOSFODNN7"],
        ),
        (
            "PUT\n/b/k\nhost:x\nx-amz-security-token:FQoGZXIvYXdz\n\nhost;x-amz-security-token",
            ["host:x", "host;x-amz-security-token"],
            ["FQoGZXIvYXdz"],
        ),
        (
            "GET https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256"
            "&X-Goog-Credential=sa%40p.iam%2F20261130&X-Goog-Date=20261130T000000Z"
            "&X-Goog-Signature=9f8e7d&X-Goog-SignedHeaders=host",
            ["X-Goog-Date=20261130T000000Z", "X-Goog-SignedHeaders=host"],
            ["sa%40p.iam", "9f8e7d"],
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2026"
            "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=FQoG&x=1",
            ["x=1"],
            ["IOSFODNN7", "deadbeef", "FQoG&"],
        ),
        (
            "{'x-goog-iam-authorization-token': 'ya29.c.secret', 'x-goog-user-project': 'p'}",
            ["x-goog-user-project': 'p'"],
            ["ya29.c.secret"],
        ),
        (
            '{"access_token": "ya29.a0Af", "refresh_token": "1//0g", "expires_in": 3599}',
            ['"expires_in": 3599'],
            ["ya29.a0Af", "1//0g"],
        ),
        ("Authorization: Bearer ya29.secret", ["Authorization:"], ["ya29.secret"]),
        ("s3://bkt/exp[1]/a?b/5 is missing", ["s3://bkt/exp[1]/a?b/5 is missing"], []),
    ],
)
def test_redact_removes_credential_values_and_keeps_the_rest(
    text: str, kept: list[str], gone: list[str]
) -> None:
    out = redact(text, secrets=[])
    for part in kept:
        assert part in out, out
    for part in gone:
        assert part not in out, out
