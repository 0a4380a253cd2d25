"""The Redis protocol between a trainer and the operator. Both sides import this module.

Every key belongs to one run and is keyed by the resource's UID, so a resource deleted and
re-created under the same name never sees the old run's data:

    modeltrainer:v1:run:<uid>:heartbeat  unix time (float) of the last heartbeat   TTL 1 day
    modeltrainer:v1:run:<uid>:state      JSON RunState: phase, reason, message     TTL 7 days
    modeltrainer:v1:run:<uid>:progress   JSON Progress (step, totalSteps, ...)     TTL 7 days
    modeltrainer:v1:run:<uid>:eval       JSON EvalMetrics of the last evaluation   TTL 7 days
    modeltrainer:v1:run:<uid>:stats      JSON TokenizerStats of a TokenizerJob     TTL 7 days
    modeltrainer:v1:run:<uid>:evaluation:<name>
                                         JSON EvaluationReport of spec.evaluations TTL 7 days
    modeltrainer:v1:run:<uid>:cancel     "1" once cancellation is requested        TTL 7 days
    modeltrainer:v1:run:<uid>:events     pub/sub channel of JSON RunEvent messages

Writers refresh the TTL on every write. The trainer writes all keys but `cancel`; the operator
writes `cancel` (from spec.cancel) and reads the rest. A user may also set `cancel` directly.
"""

from __future__ import annotations

import os
import time
from typing import Literal, NamedTuple, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model_trainer.api.common import ArtifactsStatus, EvalMetrics, Phase, Progress
from model_trainer.api.tokenizer_job import TokenizerStats

M = TypeVar("M", bound=BaseModel)

KEY_PREFIX = "modeltrainer:v1:run"
HEARTBEAT_TTL_SECONDS = 24 * 3600
STATE_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 2.0


class RunKeys(NamedTuple):
    heartbeat: str
    state: str
    progress: str
    eval: str
    cancel: str
    events: str
    stats: str

    @property
    def base(self) -> str:
        """modeltrainer:v1:run:<uid>, the prefix of every key of the run."""
        return self.heartbeat.removesuffix(":heartbeat")

    def evaluation(self, name: str) -> str:
        if not name or ":" in name:
            raise ValueError(f"invalid evaluation name {name!r}")
        return f"{self.base}:evaluation:{name}"


def keys_for(uid: str) -> RunKeys:
    if not uid or ":" in uid:
        raise ValueError(f"invalid run uid {uid!r}")
    base = f"{KEY_PREFIX}:{uid}"
    return RunKeys(
        heartbeat=f"{base}:heartbeat",
        state=f"{base}:state",
        progress=f"{base}:progress",
        eval=f"{base}:eval",
        cancel=f"{base}:cancel",
        events=f"{base}:events",
        stats=f"{base}:stats",
    )


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class RunState(_Message):
    """What the trainer says about itself."""

    phase: Phase
    reason: str = ""
    message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    artifacts: ArtifactsStatus | None = None
    attempt: int = 0
    updated_at: float = Field(default_factory=time.time)


class EvaluationReport(_Message):
    """What an evaluation pod says about one of spec.evaluations."""

    phase: Phase
    reason: str = ""
    message: str = ""
    metrics: EvalMetrics | None = None
    path: str | None = None
    attempt: int = 0
    updated_at: float = Field(default_factory=time.time)


class RunEvent(_Message):
    """One message on the events channel."""

    type: Literal["state", "progress", "eval", "heartbeat", "stats", "evaluation"]
    uid: str
    ts: float = Field(default_factory=time.time)
    state: RunState | None = None
    progress: Progress | None = None
    eval: EvalMetrics | None = None
    stats: TokenizerStats | None = None
    evaluation: EvaluationReport | None = None


class RunSnapshot(NamedTuple):
    """Everything Redis holds about one run; None where nothing was written (or it expired)."""

    heartbeat: float | None
    state: RunState | None
    progress: Progress | None
    eval: EvalMetrics | None
    cancel_requested: bool
    stats: TokenizerStats | None = None


def _decode(raw: object) -> str | None:
    if isinstance(raw, bytes):
        return raw.decode("utf-8")
    if isinstance(raw, str):
        return raw
    return None


def write_heartbeat(client: redis.Redis, uid: str, now: float | None = None) -> None:
    client.set(
        keys_for(uid).heartbeat,
        repr(now if now is not None else time.time()),
        ex=HEARTBEAT_TTL_SECONDS,
    )


def write_state(client: redis.Redis, uid: str, state: RunState) -> None:
    keys = keys_for(uid)
    event = RunEvent(type="state", uid=uid, state=state)
    pipe = client.pipeline()
    pipe.set(keys.state, state.model_dump_json(by_alias=True), ex=STATE_TTL_SECONDS)
    pipe.publish(keys.events, event.model_dump_json(by_alias=True))
    pipe.execute()


def write_progress(client: redis.Redis, uid: str, progress: Progress) -> None:
    keys = keys_for(uid)
    event = RunEvent(type="progress", uid=uid, progress=progress)
    pipe = client.pipeline()
    pipe.set(keys.progress, progress.model_dump_json(by_alias=True), ex=STATE_TTL_SECONDS)
    pipe.publish(keys.events, event.model_dump_json(by_alias=True))
    pipe.execute()


def write_eval(client: redis.Redis, uid: str, metrics: EvalMetrics) -> None:
    keys = keys_for(uid)
    event = RunEvent(type="eval", uid=uid, eval=metrics)
    pipe = client.pipeline()
    pipe.set(keys.eval, metrics.model_dump_json(by_alias=True), ex=STATE_TTL_SECONDS)
    pipe.publish(keys.events, event.model_dump_json(by_alias=True))
    pipe.execute()


def write_stats(client: redis.Redis, uid: str, stats: TokenizerStats) -> None:
    keys = keys_for(uid)
    event = RunEvent(type="stats", uid=uid, stats=stats)
    pipe = client.pipeline()
    pipe.set(keys.stats, stats.model_dump_json(by_alias=True), ex=STATE_TTL_SECONDS)
    pipe.publish(keys.events, event.model_dump_json(by_alias=True))
    pipe.execute()


def write_evaluation(client: redis.Redis, uid: str, name: str, report: EvaluationReport) -> None:
    keys = keys_for(uid)
    event = RunEvent(type="evaluation", uid=uid, evaluation=report)
    pipe = client.pipeline()
    pipe.set(keys.evaluation(name), report.model_dump_json(by_alias=True), ex=STATE_TTL_SECONDS)
    pipe.publish(keys.events, event.model_dump_json(by_alias=True))
    pipe.execute()


def read_evaluations(
    client: redis.Redis, uid: str, names: list[str]
) -> dict[str, EvaluationReport]:
    if not names:
        return {}
    keys = keys_for(uid)
    raw = client.mget([keys.evaluation(name) for name in names])
    values = [_decode(item) for item in raw] if isinstance(raw, list) else [None] * len(names)
    reports = {}
    for name, text in zip(names, values, strict=True):
        report = _parse(EvaluationReport, text)
        if report is not None:
            reports[name] = report
    return reports


def request_cancel(client: redis.Redis, uid: str) -> None:
    client.set(keys_for(uid).cancel, "1", ex=STATE_TTL_SECONDS)


CANCEL_VALUES = frozenset({"1", "true", "yes"})


def _is_cancel(value: str | None) -> bool:
    """The operator writes "1"; a person typing `SET ... true` by hand means the same."""
    return value is not None and value.strip().lower() in CANCEL_VALUES


def cancel_requested(client: redis.Redis, uid: str) -> bool:
    return _is_cancel(_decode(client.get(keys_for(uid).cancel)))


def read_run(client: redis.Redis, uid: str) -> RunSnapshot:
    keys = keys_for(uid)
    raw = client.mget(
        [keys.heartbeat, keys.state, keys.progress, keys.eval, keys.cancel, keys.stats]
    )
    values = [_decode(item) for item in raw] if isinstance(raw, list) else [None] * 6
    heartbeat_text, state_text, progress_text, eval_text, cancel_text, stats_text = values
    heartbeat: float | None
    try:
        heartbeat = float(heartbeat_text) if heartbeat_text is not None else None
    except ValueError:
        heartbeat = None
    return RunSnapshot(
        heartbeat=heartbeat,
        state=_parse(RunState, state_text),
        progress=_parse(Progress, progress_text),
        eval=_parse(EvalMetrics, eval_text),
        cancel_requested=_is_cancel(cancel_text),
        stats=_parse(TokenizerStats, stats_text),
    )


def _parse(model: type[M], text: str | None) -> M | None:
    if text is None:
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError:
        return None


def delete_run(client: redis.Redis, uid: str) -> int:
    keys = keys_for(uid)
    evaluations = [key for key in client.scan_iter(match=keys.evaluation("*"), count=100)]
    deleted = client.delete(
        keys.heartbeat, keys.state, keys.progress, keys.eval, keys.cancel, keys.stats, *evaluations
    )
    return deleted if isinstance(deleted, int) else 0


PASSWORD_ENV = "MT_REDIS_PASSWORD"


def connect(url: str, timeout_seconds: float = 2.0) -> redis.Redis:
    """A client whose calls fail fast, so that a dead Redis never stalls training.

    A password in $MT_REDIS_PASSWORD (a pod gets it from a Secret) is used where the URL has
    none, so that the URL, which lands in pod specs and logs, can go without one."""
    password = os.environ.get(PASSWORD_ENV) or None
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        health_check_interval=30,
        **({"password": password} if password else {}),
    )
