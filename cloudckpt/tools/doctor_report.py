"""What ``cloudckpt doctor`` reports: findings with a status, and the report holding them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Statuses of a finding: it works; it does not; a setting to change; could not tell; a fact.
OK, FAIL, WARN, UNKNOWN, INFO = "ok", "fail", "fix", "unknown", "info"


@dataclass
class Check:
    """One finding: ``ok``, ``fail``, ``fix`` (a setting to change), ``unknown`` or ``info``."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DoctorReport:
    url: str
    store: str = ""
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "store": self.store,
            "checks": [c.to_json() for c in self.checks],
            "failed": self.count(FAIL),
            "to_fix": self.count(WARN),
            "could_not_check": self.count(UNKNOWN),
        }


def short_error(exc: BaseException) -> str:
    """The exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
