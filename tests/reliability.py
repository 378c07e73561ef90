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

import httpx

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

    def record(self, kind: str) -> None:
        """Counts a request by what `send` says happened to it."""
        if kind == "200":
            self.ok()
        elif kind == "lost":
            self.lose()
        else:
            self.error(kind)


async def send(
    client: httpx.AsyncClient,
    path: str,
    *,
    json: dict[str, Any] | None = None,
    content: bytes | None = None,
    key: str | None = None,
) -> str:
    """Sends one POST and says what happened to it.

    Returns:
        The HTTP status ("200", "429", ...); "SSE error event" for a stream that ended with
        one; "refused" when the connection was refused (nothing was sent: explicit and safe
        to retry); "lost" for no answer, a cut connection, or a stream that ended without
        [DONE].
    """
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["content-type"] = "application/json"
    try:
        if json is not None and json.get("stream"):
            async with client.stream("POST", path, json=json, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    return str(response.status_code)
                lines = [line async for line in response.aiter_lines() if line]
            if any(line.startswith('data: {"error"') for line in lines):
                return "SSE error event"
            return "200" if lines[-1:] == ["data: [DONE]"] else "lost"
        response = await client.post(path, json=json, content=content, headers=headers)
        return str(response.status_code)
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError:
        return "lost"


@dataclass(frozen=True)
class Process:
    """One process, as /proc shows it."""

    argv: list[str]
    parent: int
    cpu_ticks: int
    """User + system CPU time, in clock ticks (os.sysconf("SC_CLK_TCK") a second)."""

    @property
    def command(self) -> str:
        return " ".join(self.argv).strip()


def processes() -> dict[int, Process]:
    """Every process on the machine, by pid (those that exit while being read are left out)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry.name)] = Process(
            [a for a in argv if a], int(fields[1]), int(fields[11]) + int(fields[12])
        )
    return found


def rss_mib(pid: int) -> float:
    """A process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


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
