"""The two resource kinds as the operator sees them: typed views of a watched object's body."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ValidationError

from model_trainer.api import (
    GROUP,
    VERSION,
    TokenizerJobSpec,
    TokenizerJobStatus,
    TrainingRunSpec,
    TrainingRunStatus,
)

Spec = TokenizerJobSpec | TrainingRunSpec
Status = TokenizerJobStatus | TrainingRunStatus


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{GROUP}/{VERSION}"


TOKENIZER_JOB = Kind("TokenizerJob", "tokenizerjobs")
TRAINING_RUN = Kind("TrainingRun", "trainingruns")
KINDS = {k.kind: k for k in (TOKENIZER_JOB, TRAINING_RUN)}


@dataclass(frozen=True)
class Resource:
    """One TokenizerJob or TrainingRun, with its spec validated by the pydantic models."""

    kind: Kind
    name: str
    namespace: str
    uid: str
    generation: int
    created: datetime
    spec: Spec | None
    """None when the stored spec does not validate; `spec_error` says why."""
    spec_error: str
    status: Status
    deleting: bool


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def format_time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def lookup(mapping: object, *path: str) -> object:
    """mapping[path[0]][path[1]]..., or None where a step is missing or not a mapping."""
    node = mapping
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _mapping(value: object) -> Mapping[str, object]:
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return {}


def _validated(model: type[BaseModel], value: object) -> tuple[BaseModel | None, str]:
    try:
        return model.model_validate(value), ""
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "spec"
        return None, f"{where}: {first['msg']}"


def parse_resource(kind: Kind, body: Mapping[str, object], now: datetime) -> Resource:
    meta = _mapping(body.get("metadata"))
    spec_model: type[BaseModel] = TokenizerJobSpec if kind is TOKENIZER_JOB else TrainingRunSpec
    status_model: type[BaseModel] = (
        TokenizerJobStatus if kind is TOKENIZER_JOB else TrainingRunStatus
    )
    spec, spec_error = _validated(spec_model, body.get("spec"))
    status, _ = _validated(status_model, body.get("status") or {})
    generation = meta.get("generation")
    return Resource(
        kind=kind,
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        uid=str(meta.get("uid", "")),
        generation=generation if isinstance(generation, int) else 0,
        created=parse_time(meta.get("creationTimestamp")) or now,
        spec=spec if isinstance(spec, TokenizerJobSpec | TrainingRunSpec) else None,
        spec_error=spec_error,
        status=status
        if isinstance(status, TokenizerJobStatus | TrainingRunStatus)
        else (TokenizerJobStatus() if kind is TOKENIZER_JOB else TrainingRunStatus()),
        deleting=meta.get("deletionTimestamp") is not None,
    )
