"""Requests held for a model with no serving replica, until it serves or a deadline passes.

A model at zero replicas (or whose first replica is still starting) is not refused: the
request, admitted with its tenant's quota reserved, waits in the gateway and is relayed once
the model serves; nothing is sent to the client before the backend answers, so a stream's
head, or a gRPC call's first message, comes only then. Past the model's hold deadline
(``hold_timeout_s``, or its entry in ``hold_timeouts``) the client gets 503 with Retry-After
(gRPC: UNAVAILABLE with ``retry-after`` metadata) and the reservation is released, charged
nothing; a client that leaves while held is released the same way.

Two signals hold a request: the graph's router answers 503 with
`llmops_contract.SCALED_TO_ZERO_CODE`, or discovery reads ``readyReplicas: 0`` for the model in
its LLMDeployment's ``status.models`` (then no upstream call is made until it reports a ready
replica). The held requests of a model share one `ModelWait`: while the router says the model
is cold, one of them at a time retries its relay as a probe, 0.5 s after the first answer and
then on a back-off doubling to 2 s, however many are held; a request arriving meanwhile joins
them without calling upstream. When a probe is answered, or discovery reports a ready
replica, every held request retries at once. Retrying is safe: no byte reached the client.

Held requests are the gauge `llmops_contract.HELD_REQUESTS_METRIC` (label ``model``), which
the model's KEDA trigger activates on, so the held request itself wakes the model; each
replica of the gateway exports its own, and KEDA sums them. ``llmops_gateway_hold_seconds``
records how long each was held, by outcome (served, expired, cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmops_contract import SCALED_TO_ZERO_CODE
from llmops_gateway.errors import GatewayError
from llmops_gateway.metrics import GatewayMetrics
from llmops_gateway.settings import GatewaySettings

PROBE_FIRST_S = 0.5
"""Pause before the first probe of a cold model."""
PROBE_MAX_S = 2.0
"""Longest pause between two probes of a cold model."""
DISCOVERY_POLL_S = 0.5
"""How often a request held on discovery's ``readyReplicas: 0`` reads the (watched) table."""
EXPIRED_RETRY_S = 10.0
"""Retry-After of a hold that expired: the model is still starting, worth another try soon."""

SERVED, EXPIRED, CANCELLED = "served", "expired", "cancelled"


class HoldExpiredError(Exception):
    """The hold deadline of a request passed before its model served."""


def scaled_to_zero(data: dict[str, Any]) -> bool:
    """Whether a backend's 503 body is the router's answer for a model with no replica."""
    error = data.get("error")
    return isinstance(error, dict) and error.get("code") == SCALED_TO_ZERO_CODE


def cold_start_timeout(model: str, waited_s: float) -> GatewayError:
    """503 for a request whose model did not serve within its hold deadline."""
    return GatewayError(
        f"model {model!r} has no serving replica yet: it was held {waited_s:.0f} s while the "
        "model starts from zero; retry shortly",
        status=503,
        grpc_code="UNAVAILABLE",
        type="server_error",
        code="model_cold_start_timeout",
        retry_after_s=EXPIRED_RETRY_S,
    )


@dataclass
class ModelWait:
    """What the requests held for one model share."""

    model: str
    held: int = 0
    epoch: int = 0
    """Counts the times the model was seen serving; a held request retries when it moves."""
    cold: bool = True
    """The last answer for the model was the router's scaled-to-zero 503."""
    probing: bool = False
    """A held request's retry (the probe) is in flight."""
    backoff: float = PROBE_FIRST_S
    next_probe: float = field(default_factory=lambda: time.monotonic() + PROBE_FIRST_S)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def wake(self) -> None:
        """Wakes every held request to look at the state again."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class Hold:
    """One held request. Made by `Holds.hold`; `close` it however the request ends."""

    def __init__(self, holds: Holds, wait: ModelWait, timeout_s: float) -> None:
        self.holds = holds
        self.wait = wait
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.seen = wait.epoch
        self.probe = False
        self.outcome: str | None = None
        self._on_zero = False

    @property
    def waited_s(self) -> float:
        """Seconds since the request was held."""
        return time.monotonic() - self.started

    async def turn(self) -> None:
        """Returns when the request should try its relay (again).

        That is: the model was seen serving since the request last tried, discovery no longer
        reports it at zero, or it is this request's turn to probe.

        Raises:
            HoldExpiredError: the deadline passed first.
        """
        wait = self.wait
        while True:
            now = time.monotonic()
            if wait.epoch != self.seen:
                self.seen = wait.epoch
                return
            if now >= self.deadline:
                self.outcome = EXPIRED
                raise HoldExpiredError
            delay = self.deadline - now
            if self.holds.at_zero(wait.model):
                self._on_zero = True
                delay = min(delay, DISCOVERY_POLL_S)
            elif self._on_zero:  # discovery reports a ready replica: go now
                self._on_zero = False
                return
            elif not wait.probing:
                if now >= wait.next_probe:
                    wait.probing = self.probe = True
                    return
                delay = min(delay, wait.next_probe - now)
            changed = wait.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), delay)

    def cold(self) -> None:
        """The request's try was answered: the model still has no replica."""
        wait, now = self.wait, time.monotonic()
        if self.probe:
            self.probe = wait.probing = False
            wait.backoff = min(wait.backoff * 2, PROBE_MAX_S)
            wait.next_probe = now + wait.backoff
        elif not wait.cold and not wait.probing:  # it served, and went cold again
            wait.backoff = PROBE_FIRST_S
            wait.next_probe = now + PROBE_FIRST_S
        wait.cold = True
        self.seen = wait.epoch
        wait.wake()

    def served(self) -> None:
        """The request's try was answered by the model: every held request retries now."""
        wait = self.wait
        self.outcome = SERVED
        if self.probe:
            self.probe = wait.probing = False
        wait.cold = False
        wait.backoff = PROBE_FIRST_S
        wait.epoch += 1
        wait.wake()

    def close(self, outcome: str | None = None) -> None:
        """Ends the hold: the gauge goes down and the hold time is recorded.

        Args:
            outcome: How it ended, if `served` or `turn` did not say (then ``cancelled``).
        """
        wait = self.wait
        self.outcome = self.outcome or outcome or CANCELLED
        if self.probe:  # the probe was cut: another request takes its turn
            self.probe = wait.probing = False
            wait.next_probe = time.monotonic()
            wait.wake()
        wait.held -= 1
        self.holds.ended(self)


class Holds:
    """The requests held by one gateway process, by model.

    Args:
        settings: The hold deadlines.
        metrics: The held gauge and the hold-time histogram.
        at_zero: Whether discovery reports the model at zero ready replicas.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        at_zero: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.at_zero = at_zero
        self._waits: dict[str, ModelWait] = {}
        self._exported: set[str] = set()

    def enabled(self, model: str) -> bool:
        """Whether requests for ``model`` are held at all (a deadline above 0)."""
        return self.timeout_s(model) > 0

    def timeout_s(self, model: str) -> float:
        """The model's hold deadline."""
        return self.settings.hold_timeouts.get(model, self.settings.hold_timeout_s)

    def held(self, model: str) -> int:
        """Requests held for ``model`` now."""
        wait = self._waits.get(model)
        return 0 if wait is None else wait.held

    def join(self, model: str) -> Hold | None:
        """A hold for a new request, when the model is known to have no replica: discovery
        reports it at zero, or requests are held on the router's answer for it. None
        otherwise (the request goes upstream, and `hold` it if the router says cold)."""
        if model not in self._exported:
            # The model's held-requests series reads 0 from its first request on, so KEDA's
            # trigger and the dashboard see 0 rather than no series before its first hold.
            self._exported.add(model)
            self.metrics.held.labels(model=model)
        if not self.enabled(model):
            return None
        wait = self._waits.get(model)
        if self.at_zero(model) or (wait is not None and wait.cold):
            return self.hold(model)
        return None

    def hold(self, model: str) -> Hold:
        """Holds a request for ``model``."""
        wait = self._waits.get(model)
        if wait is None:
            wait = self._waits[model] = ModelWait(model)
        wait.held += 1
        self.metrics.held.labels(model=model).inc()
        return Hold(self, wait, self.timeout_s(model))

    def ended(self, hold: Hold) -> None:
        """Records a hold that ended (`Hold.close`)."""
        model = hold.wait.model
        self.metrics.held.labels(model=model).dec()
        outcome = hold.outcome or CANCELLED
        self.metrics.hold_seconds.labels(model=model, outcome=outcome).observe(hold.waited_s)
        if hold.wait.held <= 0 and self._waits.get(model) is hold.wait:
            del self._waits[model]
