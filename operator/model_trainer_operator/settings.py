"""Operator settings, read from `MT_OPERATOR_*` environment variables (the Helm chart sets them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model_trainer.api.common import ResourceRequirements

ENV_PREFIX = "MT_OPERATOR_"


class OperatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    trainer_image: str = "model-trainer/trainer:0.1.0"
    """Image of trainer and evaluation pods, unless a spec names one."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    artifacts_claim: str = "model-trainer-artifacts"
    """PersistentVolumeClaim, in each job's namespace, mounted at /artifacts in trainer pods."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis as the operator reaches it."""
    trainer_redis_url: str | None = None
    """Redis as trainer pods reach it; defaults to redis_url."""
    redis_password_secret: str | None = None
    """A Secret in the job's namespace whose `password` key trainer pods get as
    MT_REDIS_PASSWORD. The operator itself never reads Secrets."""
    service_account: str | None = None
    """ServiceAccount of trainer pods; they get no API token either way."""
    default_resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "1", "memory": "2Gi"}, limits={"cpu": "2", "memory": "8Gi"}
        )
    )
    reconcile_interval_seconds: float = Field(default=1.0, gt=0)
    """How often each resource's actual state is recomputed."""
    status_min_interval_seconds: float = Field(default=1.0, ge=0)
    """At most one status patch per object per this many seconds."""
    heartbeat_timeout_seconds: float = Field(default=60.0, gt=0)
    """A running trainer silent this long gets the HeartbeatLost condition."""
    heartbeat_failure_seconds: float = Field(default=120.0, gt=0)
    """Silent this much longer again, its pod is deleted and the attempt counts as failed."""
    cancel_grace_seconds: float = Field(default=60.0, ge=0)
    """A trainer that has not stopped this long after a cancel request has its pod deleted."""
    tokenizer_grace_seconds: float = Field(default=300.0, ge=0)
    """A TrainingRun whose tokenizerRef does not exist this long after creation fails."""
    pod_termination_grace_seconds: int = Field(default=60, ge=0)
    """Time a deleted trainer pod gets to write its checkpoint after SIGTERM."""
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty means the whole cluster."""
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    """Port of /metrics; 0 turns it off."""
    health_port: int = Field(default=8081, ge=0, le=65535)
    """Port of the liveness endpoint /healthz; 0 turns it off."""

    @property
    def pod_redis_url(self) -> str:
        return self.trainer_redis_url or self.redis_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """MT_OPERATOR_TRAINER_IMAGE=... sets trainer_image; lists are comma-separated and
        default_resources is JSON."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            if name == "namespaces":
                values[name] = [part.strip() for part in raw.split(",") if part.strip()]
            elif name == "default_resources":
                values[name] = ResourceRequirements.model_validate_json(raw)
            else:
                values[name] = raw
        return cls.model_validate(values)
