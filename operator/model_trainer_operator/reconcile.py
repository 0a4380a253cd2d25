"""The level-based core: from what is observed now, the status a resource should have and the
actions that move the world towards it. Pure: no I/O, no clock, no kopf.

Every tick recomputes the phase from the pods, Redis and the clock, so a restarted operator
converges from scratch, and an action taken twice is harmless (pod names are deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from model_trainer.api import Phase, TrainingRunSpec, TrainingRunStatus
from model_trainer.api.common import ArtifactsStatus, Condition, JobStatus
from model_trainer.api.training_run import EvaluationRequest, EvaluationResult
from model_trainer.artifacts import evaluation_metrics_path
from model_trainer.errors import EXIT_CANCELLED, EXIT_INVALID_INPUT
from model_trainer.protocol import EvaluationReport, RunSnapshot
from model_trainer_operator.kinds import Resource, Status, format_time, parse_time
from model_trainer_operator.pods import PodView, artifacts_path
from model_trainer_operator.settings import OperatorSettings

EventType = Literal["Normal", "Warning"]

COND_READY = "Ready"
COND_FINISHED = "Finished"
COND_TOKENIZER = "TokenizerReady"
COND_HEARTBEAT_LOST = "HeartbeatLost"
COND_CANCEL = "CancelRequested"


@dataclass(frozen=True)
class TokenizerView:
    """The TokenizerJob a TrainingRun depends on, from the operator's index."""

    phase: Phase
    reason: str


@dataclass(frozen=True)
class Observation:
    resource: Resource
    pods: list[PodView]
    """Pods of this resource, from the index (plus a direct read where the index lagged)."""
    redis: RunSnapshot | None
    """None when Redis could not be read this tick."""
    evaluations: dict[str, EvaluationReport]
    tokenizer: TokenizerView | None
    """The tokenizerRef of a TrainingRun; None when it does not exist."""
    now: datetime


@dataclass(frozen=True)
class CreatePod:
    attempt: int
    evaluation: str | None = None


@dataclass(frozen=True)
class DeletePod:
    name: str
    reason: str


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class Plan:
    status: Status
    create: list[CreatePod] = field(default_factory=list)
    delete: list[DeletePod] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    request_cancel: bool = False
    delete_resource: bool = False


def _seconds(later: datetime, earlier: datetime | None) -> float:
    return (later - earlier).total_seconds() if earlier is not None else 0.0


def set_condition(
    status: JobStatus, type_: str, value: bool, reason: str, message: str, now: datetime
) -> None:
    """Add or update a condition; its transition time moves only when its status flips."""
    text: Literal["True", "False"] = "True" if value else "False"
    for index, cond in enumerate(status.conditions):
        if cond.type == type_:
            changed = cond.status != text
            status.conditions[index] = cond.model_copy(
                update={
                    "status": text,
                    "reason": reason,
                    "message": message,
                    "last_transition_time": format_time(now)
                    if changed
                    else cond.last_transition_time,
                }
            )
            return
    status.conditions.append(
        Condition(
            type=type_,
            status=text,
            reason=reason,
            message=message,
            last_transition_time=format_time(now),
        )
    )


def condition(status: JobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def _condition_since(status: JobStatus, type_: str) -> datetime | None:
    cond = condition(status, type_)
    if cond is None or cond.status != "True":
        return None
    return parse_time(cond.last_transition_time)


class _Planner:
    def __init__(self, obs: Observation, settings: OperatorSettings) -> None:
        self.obs = obs
        self.settings = settings
        self.resource = obs.resource
        self.now = obs.now
        status = obs.resource.status.model_copy(deep=True)
        self.plan = Plan(status=status)
        self.status = status

    # -- transitions -------------------------------------------------------------------------

    def event(self, type_: EventType, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, message))

    def set_phase(self, phase: Phase, reason: str, message: str) -> None:
        status = self.status
        if status.phase != phase:
            warning = phase in (Phase.FAILED,)
            self.event("Warning" if warning else "Normal", reason, f"{phase.value}: {message}")
        status.phase = phase
        status.reason = reason
        status.message = message
        if phase.finished:
            if status.completion_time is None:
                status.completion_time = format_time(self.now)
            set_condition(status, COND_FINISHED, True, reason, message, self.now)
            if condition(status, COND_HEARTBEAT_LOST) is not None:
                set_condition(status, COND_HEARTBEAT_LOST, False, "Finished", "", self.now)
        set_condition(status, COND_READY, phase == Phase.SUCCEEDED, reason, message, self.now)

    def finish_failed_attempt(self, pod_name: str | None, reason: str, message: str) -> None:
        """An attempt failed: replace its pod while the backoff limit allows, else fail."""
        spec = self.resource.spec
        limit = spec.backoff_limit if spec is not None else 0
        attempts = self.status.attempts
        if pod_name is not None:
            self.plan.delete.append(DeletePod(pod_name, reason))
        if attempts <= limit:
            self.event(
                "Warning",
                reason,
                f"attempt {attempts} failed: {message}; starting attempt {attempts + 1} of "
                f"{limit + 1}, which resumes from the last checkpoint",
            )
            self.start_attempt(attempts + 1, f"retrying after {reason}: {message}")
            return
        self.set_phase(
            Phase.FAILED,
            reason,
            f"{message} (attempt {attempts} of {limit + 1}; backoffLimit {limit} reached)",
        )

    def start_attempt(self, attempt: int, message: str) -> None:
        self.plan.create.append(CreatePod(attempt))
        self.status.attempts = attempt
        if self.status.start_time is None:
            self.status.start_time = format_time(self.now)
        if condition(self.status, COND_HEARTBEAT_LOST) is not None:
            set_condition(self.status, COND_HEARTBEAT_LOST, False, "PodCreated", "", self.now)
        if self.status.phase == Phase.PENDING:
            # Already Pending (a new job, or one that waited): set_phase posts no event.
            self.event("Normal", "PodCreated", f"{message} (attempt {attempt})")
        self.set_phase(Phase.PENDING, "PodCreated", message)

    # -- the main decision ---------------------------------------------------------------------

    def run(self) -> Plan:
        resource = self.resource
        status = self.status
        status.observed_generation = resource.generation or status.observed_generation
        if status.artifacts is None:
            status.artifacts = ArtifactsStatus(path=artifacts_path(resource))
        self.mirror()
        if status.phase.finished:
            self.after_finish()
            return self.plan
        if resource.spec is None:
            self.set_phase(Phase.FAILED, "InvalidSpec", resource.spec_error)
            return self.plan
        self.adopt_orphan_attempts()
        if self.cancelled():
            return self.plan
        if self.deadline_exceeded():
            return self.plan
        if status.attempts == 0:
            if self.tokenizer_ready():
                self.start_attempt(1, "trainer pod created")
            return self.plan
        self.follow_pod()
        return self.plan

    def trainer_pods(self) -> list[PodView]:
        return [p for p in self.obs.pods if p.evaluation is None]

    def current_pod(self) -> PodView | None:
        return next((p for p in self.trainer_pods() if p.attempt == self.status.attempts), None)

    def current_state_phase(self) -> Phase | None:
        """The phase the trainer of the current attempt reported, if any."""
        redis = self.obs.redis
        if redis is None or redis.state is None or redis.state.attempt != self.status.attempts:
            return None
        return redis.state.phase

    def adopt_orphan_attempts(self) -> None:
        """A pod newer than status.attempts means the operator stopped between creating it and
        recording it: adopt it rather than create another."""
        newest = max((p.attempt for p in self.trainer_pods()), default=0)
        if newest > self.status.attempts:
            self.status.attempts = newest
            if self.status.start_time is None:
                self.status.start_time = format_time(self.now)

    def mirror(self) -> None:
        redis = self.obs.redis
        status = self.status
        if redis is None:
            return
        if redis.heartbeat is not None:
            status.last_heartbeat_time = format_time(
                datetime.fromtimestamp(redis.heartbeat, tz=self.now.tzinfo)
            )
        if redis.progress is not None:
            status.progress = redis.progress
        if redis.state is not None and redis.state.artifacts is not None:
            status.artifacts = redis.state.artifacts
        if isinstance(status, TrainingRunStatus):
            if redis.eval is not None:
                status.eval = redis.eval
        elif redis.stats is not None:
            status.stats = redis.stats

    def cancelled(self) -> bool:
        spec = self.resource.spec
        redis = self.obs.redis
        by_spec = spec is not None and spec.cancel
        by_redis = redis is not None and redis.cancel_requested
        if not (by_spec or by_redis):
            return False
        if by_spec and redis is not None and not redis.cancel_requested:
            self.plan.request_cancel = True
        source = "spec.cancel" if by_spec else "the Redis cancel key"
        if _condition_since(self.status, COND_CANCEL) is None:
            self.event("Normal", "CancelRequested", f"cancellation requested through {source}")
        set_condition(self.status, COND_CANCEL, True, "CancelRequested", source, self.now)
        pod = self.current_pod()
        trainer_says = self.current_state_phase()
        if pod is None or pod.finished or trainer_says == Phase.CANCELLED:
            if pod is not None and pod.finished and pod.phase == "Succeeded":
                self.set_phase(Phase.SUCCEEDED, "Succeeded", "finished before the cancel arrived")
                return True
            self.set_phase(
                Phase.CANCELLED,
                "Cancelled",
                f"cancelled through {source}; artifacts and the last checkpoint are kept",
            )
            return True
        since = _condition_since(self.status, COND_CANCEL) or self.now
        if _seconds(self.now, since) > self.settings.cancel_grace_seconds and not pod.deleting:
            self.plan.delete.append(DeletePod(pod.name, "CancelGracePeriodExceeded"))
            self.set_phase(
                Phase.CANCELLED,
                "CancelGracePeriodExceeded",
                f"the trainer did not stop within {self.settings.cancel_grace_seconds:.0f}s of "
                f"the cancel request; its pod was deleted",
            )
        return True

    def deadline_exceeded(self) -> bool:
        spec = self.resource.spec
        started = parse_time(self.status.start_time)
        if spec is None or spec.active_deadline_seconds is None or started is None:
            return False
        if _seconds(self.now, started) <= spec.active_deadline_seconds:
            return False
        for pod in self.trainer_pods():
            if not pod.finished and not pod.deleting:
                self.plan.delete.append(DeletePod(pod.name, "DeadlineExceeded"))
        self.set_phase(
            Phase.FAILED,
            "DeadlineExceeded",
            f"running longer than activeDeadlineSeconds ({spec.active_deadline_seconds}s)",
        )
        return True

    def tokenizer_ready(self) -> bool:
        spec = self.resource.spec
        if not isinstance(spec, TrainingRunSpec):
            return True
        ref = spec.tokenizer_ref.name
        tok = self.obs.tokenizer
        if tok is None:
            waited = _seconds(self.now, self.resource.created)
            if waited > self.settings.tokenizer_grace_seconds:
                message = f"TokenizerJob {ref!r} does not exist ({waited:.0f}s after creation)"
                set_condition(
                    self.status, COND_TOKENIZER, False, "TokenizerNotFound", message, self.now
                )
                self.set_phase(Phase.FAILED, "TokenizerNotFound", message)
                return False
            message = f"waiting for TokenizerJob {ref!r} to be created"
            set_condition(
                self.status, COND_TOKENIZER, False, "TokenizerNotFound", message, self.now
            )
            self.set_phase(Phase.PENDING, "WaitingForTokenizer", message)
            return False
        if tok.phase in (Phase.FAILED, Phase.CANCELLED):
            message = f"TokenizerJob {ref!r} is {tok.phase.value}" + (
                f" ({tok.reason})" if tok.reason else ""
            )
            set_condition(self.status, COND_TOKENIZER, False, "TokenizerFailed", message, self.now)
            self.set_phase(Phase.FAILED, "TokenizerFailed", message)
            return False
        if tok.phase != Phase.SUCCEEDED:
            message = f"waiting for TokenizerJob {ref!r} to succeed (it is {tok.phase.value})"
            set_condition(
                self.status, COND_TOKENIZER, False, "TokenizerNotReady", message, self.now
            )
            self.set_phase(Phase.PENDING, "WaitingForTokenizer", message)
            return False
        set_condition(
            self.status,
            COND_TOKENIZER,
            True,
            "TokenizerSucceeded",
            f"TokenizerJob {ref!r} succeeded",
            self.now,
        )
        return True

    def follow_pod(self) -> None:
        pod = self.current_pod()
        trainer_says = self.current_state_phase()
        redis = self.obs.redis
        state_message = redis.state.message if redis is not None and redis.state else ""
        if pod is None:
            self.finish_failed_attempt(
                None, "PodVanished", f"trainer pod of attempt {self.status.attempts} disappeared"
            )
            return
        if trainer_says == Phase.SUCCEEDED or pod.phase == "Succeeded":
            self.set_phase(Phase.SUCCEEDED, "Succeeded", state_message or "trainer succeeded")
            return
        if pod.phase == "Failed":
            self.pod_failed(pod, state_message)
            return
        if pod.deleting:
            self.finish_failed_attempt(
                None, "PodDeleted", f"trainer pod {pod.name} was deleted while running"
            )
            return
        # Unknown: the node stopped reporting. The trainer's heartbeat still tells whether it
        # lives, and its silence fails the attempt like any other.
        if pod.phase in ("Running", "Unknown") or trainer_says == Phase.RUNNING:
            if self.heartbeat_lost(pod):
                return
            if self.status.phase != Phase.RUNNING:
                self.set_phase(Phase.RUNNING, "Training", state_message or "trainer running")
            elif state_message:
                self.status.message = state_message
            return
        waiting = pod.waiting_reason or "PodPending"
        self.set_phase(
            Phase.PENDING,
            waiting,
            pod.message or f"waiting for trainer pod {pod.name} to start",
        )

    def pod_failed(self, pod: PodView, state_message: str) -> None:
        redis = self.obs.redis
        state_reason = (
            redis.state.reason
            if redis is not None and redis.state and redis.state.attempt == pod.attempt
            else ""
        )
        detail = state_message or pod.message or f"exit code {pod.exit_code}"
        if pod.exit_code == EXIT_CANCELLED:
            self.set_phase(Phase.CANCELLED, "Cancelled", detail)
        elif pod.exit_code == EXIT_INVALID_INPUT:
            # Bad input fails the same way on every attempt: no retry.
            self.set_phase(Phase.FAILED, state_reason or "InvalidInput", detail)
        elif pod.oom_killed:
            self.finish_failed_attempt(None, "OOMKilled", "the trainer ran out of memory")
        else:
            self.finish_failed_attempt(
                None, state_reason or pod.terminated_reason or "Error", detail
            )

    def heartbeat_lost(self, pod: PodView) -> bool:
        redis = self.obs.redis
        if redis is None:
            return False  # Redis down: the trainer's silence tells nothing.
        base = pod.started or pod.created
        last = base
        if redis.heartbeat is not None:
            beat = datetime.fromtimestamp(redis.heartbeat, tz=self.now.tzinfo)
            last = max(beat, base) if base is not None else beat
        silent = _seconds(self.now, last)
        timeout = self.settings.heartbeat_timeout_seconds
        if silent <= timeout:
            if condition(self.status, COND_HEARTBEAT_LOST) is not None:
                set_condition(self.status, COND_HEARTBEAT_LOST, False, "HeartbeatOk", "", self.now)
            return False
        message = f"no heartbeat for {silent:.0f}s (timeout {timeout:.0f}s)"
        if _condition_since(self.status, COND_HEARTBEAT_LOST) is None:
            self.event("Warning", "HeartbeatLost", message)
        set_condition(self.status, COND_HEARTBEAT_LOST, True, "HeartbeatLost", message, self.now)
        if silent > timeout + self.settings.heartbeat_failure_seconds:
            self.finish_failed_attempt(pod.name, "HeartbeatLost", message)
            return True
        return False

    # -- after the end -------------------------------------------------------------------------

    def after_finish(self) -> None:
        status = self.status
        spec = self.resource.spec
        if status.phase == Phase.CANCELLED:
            self.kill_stragglers()
        if (
            isinstance(status, TrainingRunStatus)
            and isinstance(spec, TrainingRunSpec)
            and status.phase == Phase.SUCCEEDED
        ):
            self.evaluations(spec, status)
        if spec is None or spec.ttl_seconds_after_finished is None:
            return
        finished = parse_time(status.completion_time) or _condition_since(status, COND_FINISHED)
        if finished is None:
            return
        expired = _seconds(self.now, finished) >= spec.ttl_seconds_after_finished
        if expired and not self.resource.deleting:
            self.event(
                "Normal",
                "TTLExpired",
                f"deleting: finished {spec.ttl_seconds_after_finished}s ago",
            )
            self.plan.delete_resource = True

    def kill_stragglers(self) -> None:
        since = _condition_since(self.status, COND_CANCEL) or parse_time(
            self.status.completion_time
        )
        if since is None or _seconds(self.now, since) <= self.settings.cancel_grace_seconds:
            return
        for pod in self.trainer_pods():
            if not pod.finished and not pod.deleting:
                self.plan.delete.append(DeletePod(pod.name, "CancelGracePeriodExceeded"))

    def evaluations(self, spec: TrainingRunSpec, status: TrainingRunStatus) -> None:
        results = {r.name: r for r in status.evaluations}
        ordered: list[EvaluationResult] = []
        for request in spec.evaluations:
            result = results.pop(request.name, None) or EvaluationResult(
                name=request.name, path=evaluation_metrics_path(request.name)
            )
            ordered.append(self.evaluation(request, result))
        status.evaluations = ordered + list(results.values())

    def evaluation(self, request: EvaluationRequest, result: EvaluationResult) -> EvaluationResult:
        if result.phase.finished:
            return result
        result = result.model_copy(deep=True)
        name = request.name
        if result.attempts == 0:
            self.plan.create.append(CreatePod(1, evaluation=name))
            result.attempts = 1
            result.phase = Phase.PENDING
            result.reason = "PodCreated"
            self.event("Normal", "EvaluationStarted", f"evaluation {name!r} pod created")
            return result
        pod = next(
            (p for p in self.obs.pods if p.evaluation == name and p.attempt == result.attempts),
            None,
        )
        report = self.obs.evaluations.get(name)
        if report is not None and report.attempt != result.attempts:
            report = None
        if report is not None and report.phase == Phase.SUCCEEDED and report.metrics is not None:
            result.phase = Phase.SUCCEEDED
            result.reason = "Succeeded"
            result.metrics = report.metrics
            result.path = report.path or result.path
            result.message = report.message
            result.completion_time = format_time(self.now)
            self.event(
                "Normal",
                "EvaluationSucceeded",
                f"evaluation {name!r}: loss {report.metrics.loss:.4f}, "
                f"{report.metrics.bits_per_byte:.4f} bits/byte",
            )
            return result
        failed = (
            pod is None
            or pod.phase == "Failed"
            or (
                pod.phase == "Succeeded"  # exited 0 without a result: count as a failure
            )
        )
        if not failed:
            running = pod is not None and (
                pod.phase == "Running" or (report is not None and report.phase == Phase.RUNNING)
            )
            result.phase = Phase.RUNNING if running else Phase.PENDING
            return result
        reason = (report.reason if report is not None and report.reason else "") or (
            "PodVanished" if pod is None else (pod.terminated_reason or "Error")
        )
        message = (report.message if report is not None else "") or (
            pod.message if pod is not None else "evaluation pod disappeared"
        )
        spec = self.resource.spec
        limit = spec.backoff_limit if spec is not None else 0
        final = pod is not None and pod.exit_code in (EXIT_INVALID_INPUT, EXIT_CANCELLED)
        if result.attempts <= limit and not final:
            self.plan.create.append(CreatePod(result.attempts + 1, evaluation=name))
            result.attempts += 1
            result.phase = Phase.PENDING
            result.reason = f"Retrying{reason}"
            self.event("Warning", reason, f"evaluation {name!r} failed: {message}; retrying")
            return result
        result.phase = (
            Phase.CANCELLED if pod is not None and pod.exit_code == EXIT_CANCELLED else Phase.FAILED
        )
        result.reason = reason
        result.message = message
        result.completion_time = format_time(self.now)
        self.event("Warning", "EvaluationFailed", f"evaluation {name!r} failed: {message}")
        return result


def plan(obs: Observation, settings: OperatorSettings) -> Plan:
    """The status this resource should have now, and what to do to get there."""
    return _Planner(obs, settings).run()


def status_patch(old: Status, new: Status) -> dict[str, object]:
    """The merge patch from old to new status: changed top-level fields only, {} for none."""
    before = old.model_dump(mode="json", by_alias=True, exclude_none=True)
    after = new.model_dump(mode="json", by_alias=True, exclude_none=True)
    patch: dict[str, object] = {k: v for k, v in after.items() if before.get(k) != v}
    for key in before:
        if key not in after:
            patch[key] = None
    return patch
