"""Counting what happened to every request a fault or abuse test sent.

Each case counts requests sent, those that succeeded, those that failed with an explicit,
named error (an HTTP status, a gRPC code, an SSE error event, a refused connection), and those
lost: no answer, a connection cut without an error, or a stream that ended without [DONE] or
an error event. Tests assert on the counts (lost must be 0); the session prints them all at the
end and writes them to $LLMOPS_RELIABILITY_REPORT (JSON) when set, which docs/reliability.md
is written from.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_ENV = "LLMOPS_RELIABILITY_REPORT"


@dataclass
class Outcome:
    """The requests of one fault or abuse case."""

    case: str
    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    measured: dict[str, Any] = field(default_factory=dict)
    """Other numbers the case measured (latencies, memory)."""

    @property
    def sent(self) -> int:
        """Every request, however it ended."""
        return self.succeeded + sum(self.failed.values()) + self.lost

    def ok(self, count: int = 1) -> None:
        """Requests that got the answer they asked for."""
        self.succeeded += count

    def error(self, kind: str, count: int = 1) -> None:
        """Requests that got an explicit error, named by ``kind`` (e.g. "503", "UNAVAILABLE")."""
        self.failed[kind] += count

    def lose(self, count: int = 1) -> None:
        """Requests that got no answer, or a silently cut one."""
        self.lost += count

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "case": self.case,
            "sent": self.sent,
            "succeeded": self.succeeded,
            "failed": dict(sorted(self.failed.items())),
            "lost": self.lost,
            **({"measured": self.measured} if self.measured else {}),
        }


OUTCOMES: list[Outcome] = []


def outcome(case: str) -> Outcome:
    """A new case, reported at the end of the session."""
    result = Outcome(case)
    OUTCOMES.append(result)
    return result


def summary() -> list[str]:
    """One line per case, for the terminal."""
    lines = []
    for item in OUTCOMES:
        failed = ", ".join(f"{kind} {n}" for kind, n in sorted(item.failed.items())) or "none"
        lines.append(
            f"{item.case}: sent {item.sent}, succeeded {item.succeeded}, failed {failed}, "
            f"lost {item.lost}" + (f"; {item.measured}" if item.measured else "")
        )
    return lines


def write_report() -> Path | None:
    """Writes every case to $LLMOPS_RELIABILITY_REPORT, when set."""
    target = os.environ.get(REPORT_ENV)
    if not target or not OUTCOMES:
        return None
    path = Path(target)
    path.write_text(json.dumps([item.as_dict() for item in OUTCOMES], indent=2) + "\n")
    return path
