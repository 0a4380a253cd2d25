"""All kopf wiring, and nothing else: each handler hands its body to the Controller."""

from __future__ import annotations

import logging

import kopf
import redis
from kubernetes.client.exceptions import ApiException

from model_trainer import log, protocol
from model_trainer.api import GROUP, VERSION
from model_trainer_operator import metrics
from model_trainer_operator.cluster import Cluster, load_config
from model_trainer_operator.controller import Controller, depends_on, tokenizer_view
from model_trainer_operator.kinds import KINDS, TOKENIZER_JOB, TRAINING_RUN, Kind
from model_trainer_operator.pods import LABEL_MANAGED_BY, MANAGED_BY, PodView, pod_view
from model_trainer_operator.reconcile import Event, TokenizerView
from model_trainer_operator.settings import OperatorSettings

logger = log.get_logger(__name__)

SETTINGS = OperatorSettings.from_env()
FINALIZER = f"{GROUP}/cleanup"
CLEANUP_RETRIES = 3


class _State:
    controller: Controller | None = None


def controller() -> Controller:
    if _State.controller is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _State.controller


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: object) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    # kopf logs every timer run at INFO; our own log lines say what changed.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # A deletion seen while a tick runs (always so for the TTL's own delete) waits for the
    # timer to exit before the finalizer goes; kopf's default re-check is 60 s away.
    settings.background.cancellation_polling = 1.0
    load_config()
    _State.controller = Controller(
        settings=SETTINGS, cluster=Cluster(), redis=protocol.connect(SETTINGS.redis_url)
    )
    metrics.serve(SETTINGS.metrics_port)
    logger.info("operator_started", settings=SETTINGS.model_dump(mode="json"))


@kopf.index("v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY})
def trainer_pods(body: kopf.Body, **_: object) -> dict[str, PodView]:
    view = pod_view(body)
    return {view.owner_uid: view} if view is not None else {}


@kopf.index(GROUP, VERSION, TOKENIZER_JOB.plural)
def tokenizer_jobs(
    body: kopf.Body, namespace: str | None, name: str | None, **_: object
) -> dict[tuple[str, str], TokenizerView]:
    return {(namespace or "", name or ""): tokenizer_view(body)}


def _kind(body: kopf.Body) -> Kind:
    kind = KINDS.get(str(body.get("kind")))
    if kind is None:
        raise kopf.PermanentError(f"not a kind this operator serves: {body.get('kind')!r}")
    return kind


# sharp: a tick every interval on the clock, not an interval after the last tick ended, so a
# slow API server does not stretch the heartbeat-to-status lag.
@kopf.timer(
    GROUP, VERSION, TOKENIZER_JOB.plural, interval=SETTINGS.reconcile_interval_seconds, sharp=True
)
@kopf.timer(
    GROUP, VERSION, TRAINING_RUN.plural, interval=SETTINGS.reconcile_interval_seconds, sharp=True
)
def reconcile(
    body: kopf.Body,
    patch: kopf.Patch,
    trainer_pods: kopf.Index[str, PodView] | None = None,
    tokenizer_jobs: kopf.Index[tuple[str, str], TokenizerView] | None = None,
    **_: object,
) -> None:
    """Recompute one resource's actual state and move it on; the only reconcile path."""
    kind = _kind(body)
    if trainer_pods is None or tokenizer_jobs is None:
        raise kopf.TemporaryError("the indexes are not ready", delay=1)
    uid = body.metadata.uid or ""
    ref = depends_on(kind, body)
    tokenizer = None
    if ref is not None:
        key = (body.metadata.namespace or "", ref)
        tokenizer = next(iter(tokenizer_jobs.get(key, [])), None)

    def post(event: Event) -> None:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])

    try:
        status = controller().tick(kind, body, trainer_pods.get(uid, []), tokenizer, post)
    except ApiException as exc:
        if exc.status in (401, 403):
            # Missing RBAC rights do not heal by a quick retry; the next tick tries again.
            raise kopf.PermanentError(f"the operator is not allowed to: {exc.reason}") from exc
        raise kopf.TemporaryError(
            f"Kubernetes API error {exc.status}: {exc.reason}", delay=2
        ) from exc
    if status:
        patch.status.update(status)


@kopf.on.delete(GROUP, VERSION, TOKENIZER_JOB.plural)
@kopf.on.delete(GROUP, VERSION, TRAINING_RUN.plural)
def clean_up(body: kopf.Body, retry: int, **_: object) -> None:
    """Delete the pods and the Redis keys of a deleted resource; its artifacts stay."""
    try:
        controller().cleanup(_kind(body), body)
    except redis.RedisError as exc:
        if retry >= CLEANUP_RETRIES:
            # The keys expire on their own (TTL); never hold a deletion hostage to Redis.
            logger.warning("redis_cleanup_skipped", name=body.metadata.name, error=str(exc))
            return
        raise kopf.TemporaryError(
            f"Redis unavailable, retrying the clean-up: {exc}", delay=5
        ) from exc
