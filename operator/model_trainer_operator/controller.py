"""One reconciliation tick of one resource, and the clean-up on deletion: observe the pods,
Redis and the dependency, plan, act. Called by the kopf wiring in `handlers`; no kopf here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis

from model_trainer import log, protocol
from model_trainer.api import Phase, TrainingRunSpec, TrainingRunStatus
from model_trainer.protocol import EvaluationReport, RunSnapshot
from model_trainer_operator import metrics
from model_trainer_operator.cluster import Cluster, CreateRejected
from model_trainer_operator.kinds import TRAINING_RUN, Kind, Resource, lookup, parse_resource
from model_trainer_operator.pods import PodView, pod_manifest, pod_name, pod_view
from model_trainer_operator.reconcile import (
    Event,
    Observation,
    Plan,
    TokenizerView,
    plan,
    status_patch,
)
from model_trainer_operator.settings import OperatorSettings

logger = log.get_logger(__name__)

PostEvent = Callable[[Event], None]


@dataclass
class Controller:
    settings: OperatorSettings
    cluster: Cluster
    redis: redis.Redis
    tracker: metrics.PhaseTracker = field(default_factory=metrics.PhaseTracker)
    clock: Callable[[], float] = time.time
    _last_patch: dict[str, float] = field(default_factory=dict)
    _redis_down: bool = False

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), tz=UTC)

    # -- observation ---------------------------------------------------------------------------

    def read_redis(
        self, resource: Resource
    ) -> tuple[RunSnapshot | None, dict[str, EvaluationReport]]:
        names: list[str] = []
        if isinstance(resource.spec, TrainingRunSpec) and isinstance(
            resource.status, TrainingRunStatus
        ):
            done = {r.name for r in resource.status.evaluations if r.phase.finished}
            names = [e.name for e in resource.spec.evaluations if e.name not in done]
        try:
            snapshot = protocol.read_run(self.redis, resource.uid)
            reports = protocol.read_evaluations(self.redis, resource.uid, names)
        except redis.RedisError as exc:
            if not self._redis_down:
                logger.warning("redis_unavailable", error=str(exc))
            self._redis_down = True
            return None, {}
        if self._redis_down:
            logger.info("redis_available")
        self._redis_down = False
        return snapshot, reports

    def expected_pods(self, resource: Resource) -> list[str]:
        """Names of the pods the status says exist now, to read directly where the index lags."""
        names = []
        status = resource.status
        if status.attempts > 0 and not status.phase.finished:
            names.append(pod_name(resource, status.attempts))
        if isinstance(status, TrainingRunStatus):
            names += [
                pod_name(resource, r.attempts, r.name)
                for r in status.evaluations
                if r.attempts > 0 and not r.phase.finished
            ]
        return names

    def observe(
        self,
        resource: Resource,
        indexed_pods: Iterable[PodView],
        tokenizer: TokenizerView | None,
    ) -> Observation:
        pods = list(indexed_pods)
        known = {p.name for p in pods}
        for name in self.expected_pods(resource):
            if name not in known:
                body = self.cluster.read_pod(resource.namespace, name)
                view = pod_view(body) if body is not None else None
                if view is not None and view.owner_uid == resource.uid:
                    pods.append(view)
        snapshot, reports = self.read_redis(resource)
        return Observation(
            resource=resource,
            pods=pods,
            redis=snapshot,
            evaluations=reports,
            tokenizer=tokenizer,
            now=self.now(),
        )

    # -- one tick ------------------------------------------------------------------------------

    def tick(
        self,
        kind: Kind,
        body: Mapping[str, object],
        indexed_pods: Iterable[PodView],
        tokenizer: TokenizerView | None,
        post_event: PostEvent,
    ) -> dict[str, object]:
        """Reconcile one resource; return the status merge patch to send ({} for none)."""
        started = time.perf_counter()
        resource = parse_resource(kind, body, self.now())
        if resource.deleting:
            return {}
        try:
            observation = self.observe(resource, indexed_pods, tokenizer)
            result = plan(observation, self.settings)
            patch = status_patch(resource.status, result.status)
            last = self._last_patch.get(resource.uid)
            interval = self.settings.status_min_interval_seconds
            if patch and last is not None and self.clock() - last < interval:
                # Too soon after the last patch: act on the next tick, which recomputes
                # everything, so nothing is lost, and no event is posted twice.
                return {}
            self.act(resource, result, post_event)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(kind.kind).inc()
            raise
        finally:
            metrics.RECONCILE_SECONDS.labels(kind.kind).observe(time.perf_counter() - started)
        phase = result.status.phase
        self.tracker.observe(
            resource.uid,
            kind.kind,
            phase.value,
            self.clock(),
            first_since=resource.created.timestamp() if phase == Phase.PENDING else None,
        )
        patch = status_patch(resource.status, result.status)
        if patch:
            self._last_patch[resource.uid] = self.clock()
            metrics.STATUS_PATCHES.labels(kind.kind).inc()
        return patch

    def act(self, resource: Resource, result: Plan, post_event: PostEvent) -> None:
        if result.request_cancel:
            try:
                protocol.request_cancel(self.redis, resource.uid)
            except redis.RedisError as exc:
                logger.warning("cancel_not_sent", error=str(exc), name=resource.name)
        for delete in result.delete:
            if self.cluster.delete_pod(resource.namespace, delete.name):
                logger.info("pod_deleted", pod=delete.name, reason=delete.reason)
        for create in result.create:
            manifest = pod_manifest(resource, self.settings, create.attempt, create.evaluation)
            try:
                created = self.cluster.create_pod(manifest)
            except CreateRejected as exc:
                reason = "PodCreateRejected"
                message = f"the API server rejected the trainer pod: {exc}"
                result.events.append(Event("Warning", reason, message))
                if create.evaluation is None:
                    result.status.phase = Phase.FAILED
                    result.status.reason = reason
                    result.status.message = message
                continue
            if created:
                role = "evaluation" if create.evaluation else "trainer"
                metrics.PODS_CREATED.labels(resource.kind.kind, role).inc()
                logger.info(
                    "pod_created",
                    name=resource.name,
                    pod=manifest_name(manifest),
                    attempt=create.attempt,
                )
        if result.delete_resource:
            self.cluster.delete_resource(resource.kind, resource.namespace, resource.name)
        for event in result.events:
            log_event = logger.warning if event.type == "Warning" else logger.info
            log_event(
                "resource_event",
                kind=resource.kind.kind,
                namespace=resource.namespace,
                name=resource.name,
                reason=event.reason,
                message=event.message,
            )
            post_event(event)

    # -- deletion ------------------------------------------------------------------------------

    def cleanup(self, kind: Kind, body: Mapping[str, object]) -> None:
        """Delete the resource's pods and Redis keys; the artifacts stay on the volume.
        Raises redis.RedisError when Redis is unreachable, so the caller can retry."""
        resource = parse_resource(kind, body, self.now())
        for pod in self.cluster.list_pods(resource.namespace, resource.uid):
            view = pod_view(pod)
            if view is not None and view.owner_uid == resource.uid:
                self.cluster.delete_pod(resource.namespace, view.name)
        self.tracker.forget(resource.uid)
        self._last_patch.pop(resource.uid, None)
        protocol.delete_run(self.redis, resource.uid)
        logger.info("resource_cleaned_up", kind=kind.kind, name=resource.name, uid=resource.uid)


def manifest_name(manifest: Mapping[str, object]) -> str:
    return str(lookup(manifest, "metadata", "name") or "")


def tokenizer_view(body: Mapping[str, object]) -> TokenizerView:
    phase_text = lookup(body, "status", "phase")
    reason = lookup(body, "status", "reason")
    try:
        phase = Phase(phase_text) if isinstance(phase_text, str) else Phase.PENDING
    except ValueError:
        phase = Phase.PENDING
    return TokenizerView(phase=phase, reason=reason if isinstance(reason, str) else "")


def depends_on(kind: Kind, body: Mapping[str, object]) -> str | None:
    if kind is not TRAINING_RUN:
        return None
    name = lookup(body, "spec", "tokenizerRef", "name")
    return name if isinstance(name, str) else None
