"""Claims: the first object of every save attempt, and the state machine it carries.

A claim says which attempt (and which process on which host) owns a step, and
in which state the attempt is:

* ``writing``: the attempt is writing; only its owner may commit it.
* ``committed``: the attempt committed (the commit point of object stores);
  nobody but an explicit delete may change it again.
* ``revoked``: clean-up, a writer taking over, or the owner aborting has
  fenced the attempt off; it can never commit, and its objects may go.
* ``deleting``: an explicit delete (retention, ``rm``) of a committed step is
  in progress.

Every change of a claim is a conditional request on the exact version the
changer read (``If-Match``/``ifGenerationMatch``; ``If-None-Match: *`` to
create), so of two parties acting on one judgement exactly one succeeds.
Each version carries a fresh ``nonce``, so a writer whose response was lost
can read back whether its own version is the one stored.

Liveness (is the owner still there?) is judged from the store's clock: the
claim's modification time as the store reports it, renewed by the owner's
heartbeats, against the store's current time. Host, PID namespace and PID are
a hint for the same-host fast path only.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace

#: Default time after which an unrenewed claim is considered abandoned. Writers
#: renew their claim well within it (see :data:`RENEW_FRACTION`).
DEFAULT_GRACE_S = 3600.0
#: A writer renews its claim after this fraction of its grace period.
RENEW_FRACTION = 0.25
#: Claim states (see the module docstring).
WRITING, COMMITTED, REVOKED, DELETING = "writing", "committed", "revoked", "deleting"
STATES = frozenset({WRITING, COMMITTED, REVOKED, DELETING})
#: Largest PID any Linux accepts (pid_max is at most 2**22); others are not PIDs.
_MAX_PID = 1 << 22
_MAX_TEXT = 256


def _process_start_token(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks (Linux), to detect PID reuse."""
    if not 0 < pid <= _MAX_PID:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def pid_namespace() -> str | None:
    """An identity of this process's PID namespace (two containers sharing a hostname differ)."""
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def host_identity() -> str:
    """This host and PID namespace: PIDs compare only between processes that share both.

    Containers with host networking share a hostname but not their PIDs, so the
    hostname alone would judge a live process in another container dead.
    """
    return f"{socket.gethostname()}/pidns:{pid_namespace()}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is running (a zombie is not).

    An impossible PID (negative, zero, beyond any pid_max) is reported alive:
    nothing may be judged abandoned on the strength of a number that is no PID.
    """
    if not isinstance(pid, int) or not 0 < pid <= _MAX_PID:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


_IDENTITY: dict[int, tuple[str, str | None, str | None]] = {}


def _this_process() -> tuple[int, str, str | None, str | None]:
    """(pid, host, pid start, PID namespace) of this process, cached per PID (forks differ)."""
    pid = os.getpid()
    known = _IDENTITY.get(pid)
    if known is None:
        known = _IDENTITY[pid] = (socket.gethostname(), _process_start_token(pid), pid_namespace())
    return (pid, *known)


@dataclass(frozen=True)
class Claim:
    """One version of the ownership record of a save attempt.

    Attributes:
        attempt: The attempt id, shared by every process of one save.
        host: Host name of the process that wrote this version (a hint).
        pid: Its PID, or None when the stored value is not a PID (a hint).
        pid_start: Start time of that PID, to detect PID reuse (a hint).
        created_ns: When the writer created this version, by its own clock
            (used only when the store reports no times).
        grace_s: How long the version stays live without renewal.
        state: ``writing``, ``committed``, ``revoked`` or ``deleting``.
        nonce: Unique per version: tells a writer whether its own version is stored.
        pidns: Identity of the writer's PID namespace (a hint).
    """

    attempt: str
    host: str
    pid: int | None
    pid_start: str | None
    created_ns: int
    grace_s: float
    state: str = WRITING
    nonce: str = ""
    pidns: str | None = None

    @classmethod
    def new(cls, grace_s: float = DEFAULT_GRACE_S, attempt: str | None = None) -> Claim:
        """A ``writing`` claim for this process; ``attempt`` is shared by all processes of a save."""
        pid, host, pid_start, pidns = _this_process()
        return cls(
            attempt=attempt or uuid.uuid4().hex,
            host=host,
            pid=pid,
            pid_start=pid_start,
            created_ns=time.time_ns(),
            grace_s=float(grace_s),
            nonce=uuid.uuid4().hex,
            pidns=pidns,
        )

    def next(self, state: str | None = None) -> Claim:
        """The next version of this claim, written by this process (a renewal or a transition)."""
        mine = Claim.new(self.grace_s, self.attempt)
        return replace(mine, state=state or self.state)

    def to_bytes(self) -> bytes:
        fields = {
            "attempt": self.attempt,
            "host": self.host,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "created_ns": self.created_ns,
            "grace_s": self.grace_s,
            "state": self.state,
            "nonce": self.nonce,
            "pidns": self.pidns,
        }
        return json.dumps({"claim": fields}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Claim | None:
        """Parses a claim; None when the bytes are not a claim.

        Claims are untrusted input: every field is checked for type and range,
        and a field that is only a hint (host, PID) degrades to "unknown"
        rather than failing or crashing a reader.
        """
        try:
            if len(data) > 64 * 1024:
                return None
            fields = json.loads(data)["claim"]
            if not isinstance(fields, dict):
                return None
            attempt = fields["attempt"]
            created_ns = fields["created_ns"]
            grace_s = fields["grace_s"]
            state = fields.get("state", WRITING)
            if not isinstance(attempt, str) or not 0 < len(attempt) <= _MAX_TEXT:
                return None
            if not isinstance(created_ns, int) or isinstance(created_ns, bool):
                return None
            if not isinstance(grace_s, (int, float)) or isinstance(grace_s, bool):
                return None
            grace = float(grace_s)
            if not 0 <= grace <= 1e9 or state not in STATES:
                return None
            pid = fields.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= _MAX_PID:
                pid = None
            return cls(
                attempt=attempt,
                host=_text(fields.get("host")) or "",
                pid=pid,
                pid_start=_text(fields.get("pid_start")),
                created_ns=created_ns,
                grace_s=grace,
                state=state,
                nonce=_text(fields.get("nonce")) or "",
                pidns=_text(fields.get("pidns")),
            )
        except (ValueError, KeyError, TypeError, RecursionError):
            return None

    def age_s(self, now_ns: int | None = None) -> float:
        """Age by the writer's clock against the caller's (a fallback only)."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        return (now_ns - self.created_ns) / 1e9

    def owner_gone(self) -> bool:
        """True when this version's writer ran in this host's PID namespace and has exited.

        Hostname alone is not proof: containers sharing a hostname have
        separate PID namespaces, so the namespace must match too.
        """
        _, host, _, pidns = _this_process()
        if self.pid is None or self.host != host:
            return False
        if self.pidns != pidns and not (self.pidns is None and pidns is None):
            return False  # another PID namespace (or not recorded): no proof either way
        if not pid_alive(self.pid):
            return True
        start = _process_start_token(self.pid)
        return self.pid_start is not None and start is not None and start != self.pid_start

    def store_age_s(self, mtime: float | None, store_now: float | None) -> float:
        """Age of this version by the store's clock, falling back to the writer's."""
        if mtime is not None and store_now is not None:
            return store_now - mtime
        return self.age_s()

    def is_stale(self, mtime: float | None = None, store_now: float | None = None) -> bool:
        """Abandoned: its writer is gone (same host), or it was not renewed within its grace.

        ``mtime`` and ``store_now`` are the store's times for this version and
        for now; without them the writer's own timestamp is used.
        """
        return self.owner_gone() or self.store_age_s(mtime, store_now) > self.grace_s

    def describe(self, mtime: float | None = None, store_now: float | None = None) -> str:
        pid = "?" if self.pid is None else self.pid
        return (
            f"attempt {self.attempt[:18]} ({self.state}) by pid {pid} on {self.host}, "
            f"{self.store_age_s(mtime, store_now):.0f}s since its last renewal"
        )


def _text(value: object) -> str | None:
    return value[:_MAX_TEXT] if isinstance(value, str) else None
