"""Models shared by both resources: corpus sources, status blocks and object metadata."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "modeltrainer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

SHA256_PATTERN = r"^[0-9a-f]{64}$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected.

    Spec defaults are plain values, never default_factory (pydantic copies mutable defaults):
    only plain values reach the CRD schema, where the API server fills them in. CEL rules fail
    with "no such key" on a field left absent."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


class Phase(StrEnum):
    """Lifecycle phase of a job."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


class ConfigMapKeyRef(ApiModel):
    """A ConfigMap in the resource's namespace that holds the corpus text."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Name of the ConfigMap."""
    key: str | None = Field(default=None, min_length=1, max_length=253)
    """Key to read. When unset, the values of all keys are joined in key order."""


class CorpusSource(ApiModel):
    """Where the training text comes from. Exactly one of path, configMapRef or url is set."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.path), has(self.configMapRef), has(self.url)]"
                    ".filter(x, x).size() == 1",
                    "message": "exactly one of path, configMapRef or url must be set",
                },
                {
                    "rule": "has(self.url) == has(self.sha256)",
                    "message": "sha256 is required with url, and only with url",
                },
            ]
        }
    )

    path: str | None = Field(default=None, min_length=1, max_length=4096)
    """A UTF-8 text file, or a directory of them, on the artifacts volume (relative to its root).
    In local mode an absolute path is used as it is."""
    config_map_ref: ConfigMapKeyRef | None = None
    """A ConfigMap holding the text."""
    url: str | None = Field(default=None, min_length=1, max_length=4096, pattern=r"^https?://")
    """An http(s) URL. The download resumes after an interruption and is checked against sha256."""
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    """Lower-case hex sha256 of the bytes at url."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> CorpusSource:
        chosen = [
            n
            for n, v in (
                ("path", self.path),
                ("configMapRef", self.config_map_ref),
                ("url", self.url),
            )
            if v is not None
        ]
        if len(chosen) != 1:
            raise ValueError(
                "exactly one of path, configMapRef or url must be set, got "
                + (", ".join(chosen) if chosen else "none")
            )
        if (self.url is None) != (self.sha256 is None):
            raise ValueError("sha256 is required with url, and only with url")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return f"path:{self.path}"
        if self.config_map_ref is not None:
            key = f"/{self.config_map_ref.key}" if self.config_map_ref.key else ""
            return f"configMap:{self.config_map_ref.name}{key}"
        return f"url:{self.url}"


class ResourceRequirements(ApiModel):
    """Compute resources of the trainer container, as in a Pod spec."""

    requests: dict[str, str] | None = None
    """Minimum resources, for example {cpu: "2", memory: 4Gi}."""
    limits: dict[str, str] | None = None
    """Maximum resources. The trainer sizes its threads from the CPU limit."""


class RuntimeSpec(ApiModel):
    """Settings of the trainer pod, shared by both resources. Local mode ignores them."""

    image: str | None = Field(default=None, min_length=1)
    """Trainer image. Defaults to the operator's setting."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Pull policy of the trainer image. Defaults to the operator's setting."""
    resources: ResourceRequirements | None = None
    """Resources of the trainer container."""
    backoff_limit: int = Field(default=2, ge=0, le=100)
    """How many times a failed trainer pod is replaced. A replacement resumes from the last
    checkpoint."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job when it has run longer than this."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the resource this long after it finished. Artifacts are kept."""
    cancel: bool = False
    """Set to true to stop the job gracefully. The last checkpoint and the artifacts are kept."""


class Condition(ApiModel):
    """A Kubernetes-style status condition."""

    type: str
    """Condition type, for example Ready, TokenizerReady or HeartbeatLost."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = ""
    """Machine-readable CamelCase reason."""
    message: str = ""
    """Human-readable detail."""
    last_transition_time: str | None = None
    """RFC 3339 time of the last change of status."""


class Progress(ApiModel):
    """Training progress as last reported by the trainer."""

    step: int = Field(default=0, ge=0)
    """Optimizer steps done (merges done, for a tokenizer)."""
    total_steps: int = Field(default=0, ge=0)
    """Optimizer steps planned."""
    percent: int = Field(default=0, ge=0, le=100)
    """step / totalSteps, in percent."""
    loss: float | None = None
    """Smoothed training loss."""
    tokens_per_second: float | None = Field(default=None, ge=0)
    """Training throughput."""
    eta_seconds: float | None = Field(default=None, ge=0)
    """Estimated seconds until the last step."""


class EvalMetrics(ApiModel):
    """Holdout evaluation of a model."""

    loss: float
    """Mean cross-entropy per predicted token, in nats."""
    perplexity: float
    """exp(loss)."""
    bits_per_byte: float
    """Total nats / holdout UTF-8 bytes / ln 2: comparable across tokenizers."""
    tokens: int = Field(default=0, ge=0)
    """Tokens predicted in the evaluation."""
    step: int = Field(default=0, ge=0)
    """Optimizer step the evaluation ran at."""


class ArtifactsStatus(ApiModel):
    """Where the job's outputs are."""

    path: str
    """Directory of the outputs: <artifacts>/<namespace>/<kind plural>/<name>, where a pod
    mounts the artifacts volume at <artifacts>."""
    manifest_sha256: str | None = None
    """sha256 of manifest.json, once written."""


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata that the trainer reads."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: str = Field(min_length=1, max_length=253)
    namespace: str = "default"
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class JobStatus(ApiModel):
    """Status fields common to both resources."""

    phase: Phase = Phase.PENDING
    """Pending, Running, Succeeded, Failed or Cancelled."""
    reason: str | None = None
    """Machine-readable reason of the current phase."""
    message: str | None = None
    """Human-readable detail of the current phase."""
    conditions: list[Condition] = Field(default_factory=list)
    """Observations of the job's state."""
    start_time: str | None = None
    """RFC 3339 time the trainer started."""
    completion_time: str | None = None
    """RFC 3339 time the job finished."""
    last_heartbeat_time: str | None = None
    """RFC 3339 time of the trainer's last heartbeat."""
    progress: Progress | None = None
    """Training progress."""
    artifacts: ArtifactsStatus | None = None
    """Location and manifest digest of the outputs."""
    attempts: int = Field(default=0, ge=0)
    """Trainer pods started so far."""
    observed_generation: int | None = None
    """metadata.generation that this status describes."""
