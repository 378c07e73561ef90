"""Kopf handlers for LLMDeployment: thin adapters over `reconcile.reconcile`.

Create, spec update and resume (operator start) run a pass at once. While the deployment is not
Ready a timer repeats it, backing off while nothing changes; watching the Jobs, RayServices and
ScaledObjects it owns brings the next pass forward as soon as one of them reports. Once Ready,
a slower timer repairs drift. A model's LLMModel whose spec.replicas changed (KEDA's HPA or
`kubectl scale` wrote its /scale) runs a pass of its LLMDeployment at once, which carries the
count to that model's Serve deployment and worker group. Deletion needs no handler and no
finalizer: every child carries an owner reference, so Kubernetes' garbage collector removes
them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from llmops_contract import API_VERSION, GROUP, KIND, MODEL_PLURAL, PLURAL, VERSION
from llmops_operator import render
from llmops_operator.kube import KubeClient, KubeError
from llmops_operator.metrics import OperatorMetrics
from llmops_operator.reconcile import (
    Outcome,
    is_subset,
    make_condition,
    reconcile,
    stamp_transitions,
)
from llmops_operator.settings import OperatorSettings

LoginFn = Callable[..., kopf.ConnectionInfo | None]
# Children whose status feeds the LLMDeployment's conditions; their watch events poke a pass.
CHILDREN_WITH_STATUS = (
    ("batch", "v1", "jobs"),
    ("ray.io", "v1", "rayservices"),
    ("keda.sh", "v1alpha1", "scaledobjects"),
)
Logger = logging.Logger | logging.LoggerAdapter[Any]
# Seconds a per-object Kopf worker lingers after its last event (see kopf_settings).
WORKER_IDLE_S = 0.5
# Seconds between checks that a deleted object's timers have exited (see kopf_settings).
TIMER_EXIT_POLL_S = 1.0


@dataclass
class Pacer:
    """When each object's next pass is due (by uid).

    Not Ready (converging): the interval starts at ``base`` and doubles after each pass that
    changed nothing, up to ``ceiling``; a pass that changed something, or a poke from a child's
    watch event, makes the next one due at the next timer tick.

    Ready (resync): every ``resync`` seconds, the first one at a random point of the second
    half of that period, so that after a restart 1,000 objects do not all resync at once.
    """

    base: float
    ceiling: float
    resync: float
    _delay: dict[str, float] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)
    _resync_due: dict[str, float] = field(default_factory=dict)

    def resync_due(self, uid: str) -> bool:
        now = time.monotonic()
        due = self._resync_due.setdefault(uid, now + self.resync * random.uniform(0.5, 1.0))  # noqa: S311
        if now < due:
            return False
        self._resync_due[uid] = now + self.resync
        return True

    def due(self, uid: str) -> bool:
        return time.monotonic() >= self._due.get(uid, 0.0)

    def passed(self, uid: str, progressed: bool) -> None:
        delay = self.base if progressed else min(self._delay.get(uid, 0.0) * 2, self.ceiling)
        self._delay[uid] = max(delay, self.base)
        # A little early, so a tick landing just before the due time does not skip a period.
        self._due[uid] = time.monotonic() + self._delay[uid] - self.base / 2

    def poke(self, uid: str) -> None:
        self._delay.pop(uid, None)
        self._due.pop(uid, None)

    def forget(self, uid: str) -> None:
        self.poke(uid)
        self._resync_due.pop(uid, None)


@dataclass
class ClientHolder:
    """Shared by every per-object copy of the memo: one connection pool per process."""

    info: kopf.ConnectionInfo | None = None
    client: KubeClient | None = None
    # Change handlers and timers run concurrently; passes over one object must not overlap.
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    carried: dict[str, dict[str, int]] = field(default_factory=dict)
    """By LLMDeployment uid: the count each model's last pass carried to the graph, so an
    LLMModel event that changes nothing (a status write) runs no pass."""

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())

    def get(self) -> KubeClient:
        if self.client is None:
            if self.info is None:
                raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=5)
            self.client = KubeClient(self.info)
        return self.client


@dataclass
class Context:
    """What handlers share (Kopf passes a shallow copy of it as ``memo``)."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    holder: ClientHolder = field(default_factory=ClientHolder)
    pacer: Pacer = field(init=False)
    slots: asyncio.Semaphore = field(init=False)
    """Reconcile passes running at once, over all objects (settings.worker_limit)."""

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.settings.worker_limit)
        self.pacer = Pacer(
            self.settings.converge_interval_s,
            self.settings.converge_max_interval_s,
            self.settings.resync_interval_s,
        )

    @property
    def defaults(self) -> render.RenderDefaults:
        """Render defaults from the operator settings."""
        return render.RenderDefaults.from_settings(self.settings)


def default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, then the user's kubeconfig."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _say(body: kopf.Body, logger: Logger) -> Callable[[str, str, str], None]:
    """Logs a message and posts it as a Kubernetes Event on the LLMDeployment."""

    def say(level: str, reason: str, message: str) -> None:
        if level == "info":
            logger.info(message)
            kopf.info(body, reason=reason, message=message)
        else:
            logger.warning(message)
            kopf.warn(body, reason=reason, message=message)

    return say


async def run_pass(
    trigger: str,
    body: kopf.Body,
    patch: kopf.Patch,
    logger: Logger,
    memo: Context,
) -> Outcome | None:
    """One reconcile pass with metrics, status and errors mapped to Kopf's semantics."""
    metrics = memo.metrics
    started = time.monotonic()
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""
    try:
        async with memo.holder.lock(body.metadata.uid or f"{namespace}/{name}"), memo.slots:
            outcome = await reconcile(memo.holder.get(), body, memo.defaults, _say(body, logger))
    except render.RenderError as exc:
        metrics.reconciles.labels(trigger=trigger, result="invalid").inc()
        metrics.errors.labels(reason="InvalidSpec").inc()
        metrics.set_state(namespace, name, "Invalid")
        _report_invalid(body, patch, logger, str(exc), exc.reason)
        if trigger == "change":
            raise kopf.PermanentError(f"invalid spec: {exc}") from exc
        return None
    except KubeError as exc:
        metrics.reconciles.labels(trigger=trigger, result="error").inc()
        metrics.errors.labels(reason=f"HTTP{exc.status}").inc()
        raise kopf.TemporaryError(f"Kubernetes API call failed: {exc}", delay=10) from exc
    finally:
        metrics.duration.labels(trigger=trigger).observe(time.monotonic() - started)
    if not is_subset(outcome.status, dict(body.status)):  # unchanged status: no write, no event
        patch.status.update(outcome.status)
    metrics.reconciles.labels(
        trigger=trigger, result="ready" if outcome.ready else "progressing"
    ).inc()
    metrics.set_state(namespace, name, "Ready" if outcome.ready else "NotReady")
    ready_replicas = int(outcome.status.get("replicas", 0))
    metrics.set_replicas(namespace, name, outcome.desired_replicas, ready_replicas)
    metrics.set_model_replicas(namespace, name, outcome.model_replicas)
    if body.metadata.uid:
        counts = {model: desired for model, (desired, _) in outcome.model_replicas.items()}
        memo.holder.carried[body.metadata.uid] = counts
    for action, keys in (
        ("created", outcome.created),
        ("patched", outcome.patched),
        ("deleted", outcome.deleted),
    ):
        for key in keys:
            metrics.changes.labels(kind=key.split("/", 1)[0], action=action).inc()
        if keys:  # one Event per action and pass keeps `kubectl describe` readable
            _say(body, logger)("info", action.capitalize(), f"{action} {', '.join(keys)}")
    return outcome


async def run_owner_pass(namespace: str, name: str, logger: Logger, memo: Context) -> None:
    """A pass over one LLMDeployment outside its own handlers (a model's scale changed):
    reads it, runs the pass and writes its status, as Kopf does for its handlers."""
    client = memo.holder.get()
    raw = await client.get(API_VERSION, KIND, namespace, name)
    if raw is None or raw.get("metadata", {}).get("deletionTimestamp"):
        return
    body, patch = kopf.Body(cast(kopf.RawBody, raw)), kopf.Patch()
    try:
        await run_pass("scale", body, patch, logger, memo)
    except (kopf.PermanentError, kopf.TemporaryError) as exc:
        logger.warning(f"pass after a model's scale change failed: {exc}")
    if patch.get("status"):
        await client.merge_patch(
            API_VERSION, KIND, namespace, name, {"status": dict(patch["status"])}, "status"
        )


def _report_invalid(
    body: kopf.Body,
    patch: kopf.Patch,
    logger: Logger,
    message: str,
    reason: str = "InvalidSpec",
) -> None:
    """Ready=False with the refusal's reason (InvalidSpec, NameTooLong); an Event only when
    this is news."""
    generation = body.metadata.get("generation")
    previous = {c.get("type"): c for c in body.status.get("conditions", [])}
    old = previous.get("Ready", {})
    if not (old.get("reason") == reason and old.get("message") == message):
        _say(body, logger)("warning", reason, f"invalid spec: {message}")
    ready = make_condition("Ready", False, reason, message[:2000], generation)
    (condition,) = stamp_transitions([ready], list(previous.values()))
    kept = [c for t, c in previous.items() if t != "Ready"]
    status = {"observedGeneration": generation, "ready": "False", "conditions": [*kept, condition]}
    if not is_subset(status, dict(body.status)):
        patch.status.update(status)


def _not_ready(status: kopf.Status, **_: Any) -> bool:
    return bool(status.get("ready") != "True")


def _ready(status: kopf.Status, **_: Any) -> bool:
    return bool(status.get("ready") == "True")


def kopf_settings(settings: OperatorSettings) -> kopf.OperatorSettings:
    """Kopf's own settings: state in annotations (the status stays ours), worker limit."""
    configured = kopf.OperatorSettings()
    configured.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    configured.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    configured.persistence.finalizer = f"{GROUP}/finalizer"
    configured.posting.level = logging.INFO
    # No limit on Kopf's per-object event workers: they only track each object's latest body,
    # which timers read. Under Kopf's limit, a flood of events left timers working on stale
    # bodies (re-announcing conditions, re-writing status: more events). The operator's
    # worker_limit bounds reconcile passes instead (Context.slots), timers included.
    configured.queueing.worker_limit = None
    # An idle event worker lingers this long after its object's last event (Kopf: 5 s).
    configured.queueing.idle_timeout = WORKER_IDLE_S
    # A deleted object keeps its finalizer until its timers exit; a timer caught mid-pass is
    # re-checked after this long (Kopf: 60 s, which `kubectl delete` would wait out).
    configured.background.cancellation_polling = TIMER_EXIT_POLL_S
    # Replicas of one Deployment share a configured priority; Kopf pauses all peers of equal
    # priority, so a random tiebreak below it picks one active replica.
    configured.peering.priority = settings.priority * 1000 + secrets.randbelow(1000)
    configured.peering.name = settings.peering_name
    configured.peering.standalone = settings.standalone
    # With peering on, the peering CRD must exist: two active replicas would fight.
    configured.peering.mandatory = not settings.standalone
    return configured


def build_registry(
    settings: OperatorSettings, login: LoginFn = default_login
) -> kopf.OperatorRegistry:
    """Registers the operator's handlers in a fresh registry."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=registry)
    def on_login_cluster(memo: Context, **kwargs: Any) -> kopf.ConnectionInfo | None:
        info = login(**kwargs)
        memo.holder.info = info
        if memo.holder.client is not None:  # credentials rotated: reconnect lazily
            asyncio.get_running_loop().create_task(memo.holder.client.close())
            memo.holder.client = None
        return info

    @kopf.on.cleanup(registry=registry)
    async def on_cleanup_operator(memo: Context, **_: Any) -> None:
        if memo.holder.client is not None:
            await memo.holder.client.close()

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, field="spec", registry=registry)
    async def on_change_llmdeployment(
        body: kopf.Body,
        patch: kopf.Patch,
        logger: Logger,
        memo: Context,
        **_: Any,
    ) -> None:
        await run_pass("change", body, patch, logger, memo)
        memo.pacer.poke(body.metadata.uid or "")  # converge briskly after a change

    @kopf.timer(
        *resource, interval=settings.converge_interval_s, when=_not_ready, registry=registry
    )
    async def on_timer_converge_llmdeployment(
        body: kopf.Body,
        patch: kopf.Patch,
        logger: Logger,
        memo: Context,
        **_: Any,
    ) -> None:
        uid = body.metadata.uid or ""
        if not memo.pacer.due(uid):
            return
        outcome = await run_pass("converge", body, patch, logger, memo)
        progressed = bool(patch.status) or bool(
            outcome and (outcome.created or outcome.patched or outcome.deleted)
        )
        memo.pacer.passed(uid, progressed)

    for group, version, plural in CHILDREN_WITH_STATUS:

        @kopf.on.event(
            group,
            version,
            plural,
            labels={render.MANAGED_BY_LABEL: render.MANAGED_BY},
            registry=registry,
        )
        def on_event_child(body: kopf.Body, memo: Context, **_: Any) -> None:
            for owner in body.metadata.get("ownerReferences", []):
                if owner.get("kind") == KIND and owner.get("controller"):
                    memo.pacer.poke(owner.get("uid", ""))

    @kopf.timer(
        *resource,
        interval=max(settings.resync_interval_s / 10, settings.converge_interval_s),
        when=_ready,
        registry=registry,
    )
    async def on_timer_resync_llmdeployment(
        body: kopf.Body,
        patch: kopf.Patch,
        logger: Logger,
        memo: Context,
        **_: Any,
    ) -> None:
        if memo.pacer.resync_due(body.metadata.uid or ""):
            await run_pass("resync", body, patch, logger, memo)

    @kopf.on.event(
        GROUP,
        VERSION,
        MODEL_PLURAL,
        labels={render.MANAGED_BY_LABEL: render.MANAGED_BY},
        registry=registry,
    )
    async def on_event_llmmodel(
        event: kopf.RawEvent, body: kopf.Body, logger: Logger, memo: Context, **_: Any
    ) -> None:
        if event.get("type") == "DELETED":
            return
        owner = next(
            (
                o
                for o in body.metadata.get("ownerReferences", [])
                if o.get("kind") == KIND and o.get("controller")
            ),
            None,
        )
        if owner is None:
            return
        carried = memo.holder.carried.get(owner.get("uid", ""))
        model, replicas = body.spec.get("model"), body.spec.get("replicas")
        # Before the owner's first pass (operator start) that pass reads the count itself.
        if carried is None or carried.get(str(model)) == replicas:
            return
        await run_owner_pass(body.metadata.namespace or "default", owner["name"], logger, memo)

    @kopf.on.delete(*resource, optional=True, registry=registry)
    def on_delete_llmdeployment(body: kopf.Body, memo: Context, **_: Any) -> None:
        memo.metrics.set_state(body.metadata.namespace or "default", body.metadata.name or "", None)
        memo.holder.locks.pop(body.metadata.uid or "", None)
        memo.holder.carried.pop(body.metadata.uid or "", None)
        memo.pacer.forget(body.metadata.uid or "")

    return registry
