"""Claims: the first object of every save attempt, naming its owner.

A claim says which attempt (and which process on which host) is writing a
temporary path, and since when. It serves two purposes:

* On object stores it is created with a create-only put before any data, so
  of two writers racing for the same step exactly one gets it and the other
  fails before writing its first byte.
* Clean-up uses it to tell a crashed writer's leftovers (owner process gone,
  or older than the grace period) from a live writer's in-flight save, which
  it must not touch.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

#: Default time after which an uncommitted claim is considered abandoned even
#: when its owner cannot be checked (another host). A save must commit within
#: it; writers refuse to commit a save older than this.
DEFAULT_GRACE_S = 3600.0


def _process_start_token(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks (Linux), to detect PID reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is running (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


@dataclass(frozen=True)
class Claim:
    """Ownership record of one save attempt."""

    attempt: str
    host: str
    pid: int
    pid_start: str | None
    created_ns: int
    grace_s: float

    @classmethod
    def new(cls, grace_s: float = DEFAULT_GRACE_S, attempt: str | None = None) -> Claim:
        """A claim for this process; ``attempt`` is shared by all processes of one save."""
        pid = os.getpid()
        return cls(
            attempt=attempt or uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=pid,
            pid_start=_process_start_token(pid),
            created_ns=time.time_ns(),
            grace_s=float(grace_s),
        )

    def to_bytes(self) -> bytes:
        return json.dumps({"claim": asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Claim | None:
        """Parses a claim; None when the bytes are not a claim (e.g. truncated)."""
        try:
            fields = json.loads(data)["claim"]
            return cls(
                attempt=str(fields["attempt"]),
                host=str(fields["host"]),
                pid=int(fields["pid"]),
                pid_start=fields.get("pid_start"),
                created_ns=int(fields["created_ns"]),
                grace_s=float(fields["grace_s"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def age_s(self, now_ns: int | None = None) -> float:
        now_ns = time.time_ns() if now_ns is None else now_ns
        return (now_ns - self.created_ns) / 1e9

    def owner_gone(self) -> bool:
        """True when the owner ran on this host and that process no longer exists."""
        if self.host != socket.gethostname():
            return False
        if not pid_alive(self.pid):
            return True
        start = _process_start_token(self.pid)
        return self.pid_start is not None and start is not None and start != self.pid_start

    def is_stale(self, now_ns: int | None = None) -> bool:
        """An abandoned claim: its owner is gone, or it outlived its grace period."""
        return self.owner_gone() or self.age_s(now_ns) > self.grace_s

    def describe(self) -> str:
        return (
            f"attempt {self.attempt[:12]} by pid {self.pid} on {self.host}, {self.age_s():.0f}s old"
        )
