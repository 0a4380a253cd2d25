"""Trainer and evaluation pods: deterministic names, the manifest, and a small view of a pod."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from model_trainer.api import TokenizerJobSpec, TrainingRunSpec
from model_trainer.api.common import CorpusSource, ResourceRequirements
from model_trainer.artifacts import KIND_DIRS
from model_trainer_operator.kinds import Resource, lookup, parse_time
from model_trainer_operator.settings import OperatorSettings

JsonDict = dict[str, object]

ARTIFACTS_MOUNT = "/artifacts"
CONFIGMAP_MOUNT = "/etc/model-trainer/configmaps"
CONTAINER = "trainer"
RUN_AS = 10001

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "model-trainer-operator"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_KIND = "modeltrainer.io/kind"
LABEL_NAME = "modeltrainer.io/name"
LABEL_UID = "modeltrainer.io/uid"
LABEL_ATTEMPT = "modeltrainer.io/attempt"
LABEL_EVALUATION = "modeltrainer.io/evaluation"
POD_SELECTOR = {LABEL_MANAGED_BY: MANAGED_BY}


def _short(text: str, limit: int) -> str:
    """text if it fits, else a prefix and a digest of the whole, so names stay unique."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{text[: limit - 7].rstrip('-.')}-{digest}"


def pod_name(resource: Resource, attempt: int, evaluation: str | None = None) -> str:
    """`<name>-<uid prefix>-<attempt>`, or `<name>-<uid prefix>-e-<evaluation>-<attempt>`: the same
    inputs always give the same name, so a restarted operator never makes a second pod."""
    uid = resource.uid.replace("-", "")[:8]
    if evaluation is None:
        return f"{_short(resource.name, 50)}-{uid}-{attempt}"
    return f"{_short(resource.name, 30)}-{uid}-e-{_short(evaluation, 16)}-{attempt}"


@dataclass(frozen=True)
class PodView:
    """What the operator needs of a pod; kept in the in-memory index instead of whole bodies."""

    name: str
    owner_uid: str
    attempt: int
    evaluation: str | None
    phase: str
    created: datetime | None
    started: datetime | None
    deleting: bool
    exit_code: int | None
    terminated_reason: str
    message: str
    waiting_reason: str

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def oom_killed(self) -> bool:
        return self.terminated_reason == "OOMKilled"


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def pod_view(body: Mapping[str, object]) -> PodView | None:
    """The view of a pod this operator made, or None for any other pod."""
    labels = lookup(body, "metadata", "labels")
    if not isinstance(labels, Mapping) or labels.get(LABEL_MANAGED_BY) != MANAGED_BY:
        return None
    owner_uid = _text(labels.get(LABEL_UID))
    attempt_text = _text(labels.get(LABEL_ATTEMPT))
    if not owner_uid or not attempt_text.isdigit():
        return None
    exit_code: int | None = None
    terminated_reason = message = waiting_reason = ""
    statuses = lookup(body, "status", "containerStatuses")
    for status in statuses if isinstance(statuses, Sequence) else []:
        if lookup(status, "name") != CONTAINER:
            continue
        terminated = lookup(status, "state", "terminated")
        if isinstance(terminated, Mapping):
            code = terminated.get("exitCode")
            exit_code = code if isinstance(code, int) else None
            terminated_reason = _text(terminated.get("reason"))
            message = _text(terminated.get("message"))
        waiting = lookup(status, "state", "waiting")
        if isinstance(waiting, Mapping):
            waiting_reason = _text(waiting.get("reason"))
            message = message or _text(waiting.get("message"))
    if not message:
        message = _text(lookup(body, "status", "message"))
    evaluation = _text(labels.get(LABEL_EVALUATION)) or None
    return PodView(
        name=_text(lookup(body, "metadata", "name")),
        owner_uid=owner_uid,
        attempt=int(attempt_text),
        evaluation=evaluation,
        phase=_text(lookup(body, "status", "phase")) or "Pending",
        created=parse_time(lookup(body, "metadata", "creationTimestamp")),
        started=parse_time(lookup(body, "status", "startTime")),
        deleting=lookup(body, "metadata", "deletionTimestamp") is not None,
        exit_code=exit_code,
        terminated_reason=terminated_reason,
        message=message.strip()[-1024:],
        waiting_reason=waiting_reason,
    )


def _label_value(text: str) -> str:
    return _short(text, 63)


def _corpora(spec: TokenizerJobSpec | TrainingRunSpec) -> list[CorpusSource]:
    corpora = [spec.corpus]
    if isinstance(spec, TrainingRunSpec):
        corpora += [e.corpus for e in spec.evaluations if e.corpus is not None]
    return corpora


def _resources(requirements: ResourceRequirements) -> JsonDict:
    return {
        key: value
        for key, value in (("requests", requirements.requests), ("limits", requirements.limits))
        if value
    }


def resource_document(resource: Resource) -> JsonDict:
    """The resource as the trainer reads it from MT_RESOURCE."""
    spec = resource.spec
    if spec is None:
        raise ValueError(f"{resource.kind.kind} {resource.name} has no valid spec")
    return {
        "apiVersion": resource.kind.api_version,
        "kind": resource.kind.kind,
        "metadata": {"name": resource.name, "namespace": resource.namespace, "uid": resource.uid},
        "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def artifacts_path(resource: Resource) -> str:
    return f"{ARTIFACTS_MOUNT}/{resource.namespace}/{KIND_DIRS[resource.kind.kind]}/{resource.name}"


def pod_manifest(
    resource: Resource,
    settings: OperatorSettings,
    attempt: int,
    evaluation: str | None = None,
) -> JsonDict:
    spec = resource.spec
    if spec is None:
        raise ValueError(f"{resource.kind.kind} {resource.name} has no valid spec")
    labels = {
        "app.kubernetes.io/name": "model-trainer",
        LABEL_COMPONENT: "evaluation" if evaluation else "trainer",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_KIND: resource.kind.kind,
        LABEL_NAME: _label_value(resource.name),
        LABEL_UID: resource.uid,
        LABEL_ATTEMPT: str(attempt),
    }
    env: list[JsonDict] = [
        {"name": "MT_RESOURCE", "value": json.dumps(resource_document(resource))},
        {"name": "MT_ARTIFACTS_DIR", "value": ARTIFACTS_MOUNT},
        {"name": "MT_CONFIGMAP_DIR", "value": CONFIGMAP_MOUNT},
        {"name": "MT_REDIS_URL", "value": settings.pod_redis_url},
        {"name": "MT_ATTEMPT", "value": str(attempt)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if evaluation is not None:
        labels[LABEL_EVALUATION] = evaluation
        env.append({"name": "MT_EVALUATION", "value": evaluation})
    if settings.redis_password_secret:
        env.append(
            {
                "name": "MT_REDIS_PASSWORD",
                "valueFrom": {
                    "secretKeyRef": {"name": settings.redis_password_secret, "key": "password"}
                },
            }
        )
    mounts: list[JsonDict] = [
        {"name": "artifacts", "mountPath": ARTIFACTS_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[JsonDict] = [
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": settings.artifacts_claim}},
        {"name": "tmp", "emptyDir": {}},
    ]
    config_maps = sorted(
        {c.config_map_ref.name for c in _corpora(spec) if c.config_map_ref is not None}
    )
    for index, name in enumerate(config_maps):
        volume = f"corpus-{index}"
        volumes.append({"name": volume, "configMap": {"name": name}})
        mounts.append({"name": volume, "mountPath": f"{CONFIGMAP_MOUNT}/{name}", "readOnly": True})
    container: JsonDict = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": spec.image_pull_policy or settings.image_pull_policy,
        "command": ["model-trainer", "job"],
        "env": env,
        "resources": _resources(spec.resources or settings.default_resources),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: JsonDict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.pod_termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(resource, attempt, evaluation),
            "namespace": resource.namespace,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": resource.kind.api_version,
                    "kind": resource.kind.kind,
                    "name": resource.name,
                    "uid": resource.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }
