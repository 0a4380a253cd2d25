"""The operator's planner, without kopf or a cluster: observed state in, status and actions out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from model_trainer.api import Phase, Progress, TrainingRunStatus
from model_trainer.protocol import RunSnapshot, RunState
from model_trainer_operator.kinds import TOKENIZER_JOB, TRAINING_RUN, parse_resource
from model_trainer_operator.pods import PodView, pod_manifest, pod_name, pod_view
from model_trainer_operator.reconcile import (
    CreatePod,
    Observation,
    TokenizerView,
    plan,
    status_patch,
)
from model_trainer_operator.settings import OperatorSettings

NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(
    heartbeat_timeout_seconds=60,
    heartbeat_failure_seconds=60,
    cancel_grace_seconds=30,
    tokenizer_grace_seconds=120,
)
CORPUS = {"configMapRef": {"name": "corpus", "key": "text"}}


def body(kind=TOKENIZER_JOB, spec=None, status=None, created=NOW - timedelta(seconds=5)):
    base_spec: dict[str, object] = {"corpus": CORPUS}
    if kind is TRAINING_RUN:
        base_spec["tokenizerRef"] = {"name": "tok"}
    return {
        "metadata": {
            "name": "job",
            "namespace": "ns",
            "uid": "0123abcd-ef01-2345-6789-abcdef012345",
            "generation": 1,
            "creationTimestamp": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "spec": {**base_spec, **(spec or {})},
        "status": status or {},
    }


def pod(attempt=1, phase="Running", exit_code=None, reason="", started=NOW, evaluation=None):
    return PodView(
        name=f"job-0123abcd-{attempt}",
        owner_uid="0123abcd-ef01-2345-6789-abcdef012345",
        attempt=attempt,
        evaluation=evaluation,
        phase=phase,
        created=started,
        started=started,
        deleting=False,
        exit_code=exit_code,
        terminated_reason=reason,
        message="",
        waiting_reason="",
    )


def snapshot(heartbeat=None, state=None, progress=None, cancel=False):
    return RunSnapshot(
        heartbeat=heartbeat.timestamp() if heartbeat else None,
        state=state,
        progress=progress,
        eval=None,
        cancel_requested=cancel,
    )


def observe(raw, pods=(), redis=None, tokenizer=None, now=NOW, kind=TOKENIZER_JOB):
    return Observation(
        resource=parse_resource(kind, raw, now),
        pods=list(pods),
        redis=redis if redis is not None else snapshot(),
        evaluations={},
        tokenizer=tokenizer,
        now=now,
    )


def running_status(**extra):
    return {
        "phase": "Running",
        "attempts": 1,
        "startTime": (NOW - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **extra,
    }


def test_a_new_job_gets_its_first_pod():
    result = plan(observe(body()), SETTINGS)
    assert result.create == [CreatePod(1)]
    assert result.status.attempts == 1
    assert result.status.phase == Phase.PENDING
    assert result.status.start_time is not None


def test_a_training_run_waits_for_its_tokenizer_then_fails_after_the_grace_period():
    waiting = plan(observe(body(TRAINING_RUN), kind=TRAINING_RUN), SETTINGS)
    assert waiting.create == []
    assert waiting.status.phase == Phase.PENDING
    assert waiting.status.reason == "WaitingForTokenizer"
    cond = next(c for c in waiting.status.conditions if c.type == "TokenizerReady")
    assert (cond.status, cond.reason) == ("False", "TokenizerNotFound")

    late = body(TRAINING_RUN, created=NOW - timedelta(seconds=121))
    failed = plan(observe(late, kind=TRAINING_RUN), SETTINGS)
    assert (failed.status.phase, failed.status.reason) == (Phase.FAILED, "TokenizerNotFound")

    running = TokenizerView(phase=Phase.RUNNING, reason="")
    assert plan(observe(late, tokenizer=running, kind=TRAINING_RUN), SETTINGS).create == []
    done = TokenizerView(phase=Phase.SUCCEEDED, reason="")
    assert plan(observe(late, tokenizer=done, kind=TRAINING_RUN), SETTINGS).create == [CreatePod(1)]
    broken = TokenizerView(phase=Phase.FAILED, reason="InvalidCorpus")
    result = plan(observe(body(TRAINING_RUN), tokenizer=broken, kind=TRAINING_RUN), SETTINGS)
    assert (result.status.phase, result.status.reason) == (Phase.FAILED, "TokenizerFailed")
    assert "InvalidCorpus" in (result.status.message or "")


def test_progress_and_heartbeat_are_mirrored_and_unchanged_state_patches_nothing():
    raw = body(status=running_status())
    redis = snapshot(
        heartbeat=NOW - timedelta(seconds=1),
        state=RunState(phase=Phase.RUNNING, attempt=1, message="step 5"),
        progress=Progress(step=5, total_steps=10, percent=50, loss=3.2),
    )
    result = plan(observe(raw, [pod()], redis), SETTINGS)
    assert result.status.progress == Progress(step=5, total_steps=10, percent=50, loss=3.2)
    assert result.status.last_heartbeat_time == "2026-12-04T11:59:59Z"
    patch = status_patch(parse_resource(TOKENIZER_JOB, raw, NOW).status, result.status)
    assert {"progress", "lastHeartbeatTime"} <= set(patch)

    again = body(status=result.status.model_dump(mode="json", by_alias=True, exclude_none=True))
    second = plan(observe(again, [pod()], redis), SETTINGS)
    assert status_patch(parse_resource(TOKENIZER_JOB, again, NOW).status, second.status) == {}
    assert second.events == []


def test_a_failed_pod_is_retried_until_the_backoff_limit():
    raw = body(spec={"backoffLimit": 1}, status=running_status())
    result = plan(observe(raw, [pod(phase="Failed", exit_code=1)]), SETTINGS)
    assert result.create == [CreatePod(2)]
    assert result.status.attempts == 2
    assert any(e.type == "Warning" and "attempt 2" in e.message for e in result.events)

    second = body(spec={"backoffLimit": 1}, status=running_status(attempts=2))
    pods = [pod(phase="Failed", exit_code=1), pod(2, phase="Failed", exit_code=1)]
    final = plan(observe(second, pods), SETTINGS)
    assert final.create == []
    assert final.status.phase == Phase.FAILED
    assert "backoffLimit 1 reached" in (final.status.message or "")


@pytest.mark.parametrize(
    ("exit_code", "reason", "phase", "retried"),
    [
        (137, "OOMKilled", Phase.PENDING, True),
        (2, "Error", Phase.FAILED, False),
        (3, "Error", Phase.CANCELLED, False),
    ],
)
def test_exit_codes_decide_between_retry_and_final_phases(exit_code, reason, phase, retried):
    raw = body(status=running_status())
    result = plan(observe(raw, [pod(phase="Failed", exit_code=exit_code, reason=reason)]), SETTINGS)
    assert result.status.phase == phase
    assert (result.create == [CreatePod(2)]) == retried


def test_oom_killed_without_retries_fails_with_that_reason():
    raw = body(spec={"backoffLimit": 0}, status=running_status())
    result = plan(observe(raw, [pod(phase="Failed", exit_code=137, reason="OOMKilled")]), SETTINGS)
    assert (result.status.phase, result.status.reason) == (Phase.FAILED, "OOMKilled")


def test_a_vanished_pod_counts_as_a_failed_attempt():
    raw = body(spec={"backoffLimit": 0}, status=running_status())
    result = plan(observe(raw, []), SETTINGS)
    assert (result.status.phase, result.status.reason) == (Phase.FAILED, "PodVanished")


def test_an_orphan_pod_from_before_a_restart_is_adopted_not_duplicated():
    result = plan(observe(body(), [pod(1, phase="Pending")]), SETTINGS)
    assert result.create == []
    assert result.status.attempts == 1


def test_heartbeat_loss_sets_a_condition_then_fails_the_attempt():
    raw = body(spec={"backoffLimit": 0}, status=running_status())
    started = NOW - timedelta(seconds=200)
    quiet = snapshot(heartbeat=NOW - timedelta(seconds=90))
    warned = plan(observe(raw, [pod(started=started)], quiet), SETTINGS)
    assert warned.status.phase == Phase.RUNNING
    lost = next(c for c in warned.status.conditions if c.type == "HeartbeatLost")
    assert lost.status == "True"
    silent = snapshot(heartbeat=NOW - timedelta(seconds=121))
    failed = plan(observe(raw, [pod(started=started)], silent), SETTINGS)
    assert (failed.status.phase, failed.status.reason) == (Phase.FAILED, "HeartbeatLost")
    assert [d.name for d in failed.delete] == ["job-0123abcd-1"]


def test_without_redis_the_heartbeat_is_not_judged():
    raw = body(status=running_status())
    obs = observe(raw, [pod(started=NOW - timedelta(hours=1))])
    obs = Observation(obs.resource, obs.pods, None, {}, None, NOW)
    assert plan(obs, SETTINGS).status.phase == Phase.RUNNING


def test_cancel_is_sent_to_redis_and_a_stuck_pod_is_deleted_after_the_grace_period():
    raw = body(spec={"cancel": True}, status=running_status())
    first = plan(observe(raw, [pod()]), SETTINGS)
    assert first.request_cancel
    assert first.status.phase == Phase.RUNNING
    assert first.delete == []
    since = (NOW - timedelta(seconds=31)).strftime("%Y-%m-%dT%H:%M:%SZ")
    cond = {"type": "CancelRequested", "status": "True", "lastTransitionTime": since}
    stuck = body(spec={"cancel": True}, status=running_status(conditions=[cond]))
    result = plan(observe(stuck, [pod()], snapshot(cancel=True)), SETTINGS)
    assert not result.request_cancel
    assert [d.reason for d in result.delete] == ["CancelGracePeriodExceeded"]
    assert result.status.phase == Phase.CANCELLED


def test_a_cancel_key_set_in_redis_cancels_a_job_without_a_pod():
    raw = body(TRAINING_RUN)
    result = plan(observe(raw, redis=snapshot(cancel=True), kind=TRAINING_RUN), SETTINGS)
    assert result.status.phase == Phase.CANCELLED
    assert result.create == []


def test_deadline_and_ttl():
    started = (NOW - timedelta(seconds=11)).strftime("%Y-%m-%dT%H:%M:%SZ")
    raw = body(spec={"activeDeadlineSeconds": 10}, status=running_status(startTime=started))
    result = plan(observe(raw, [pod()]), SETTINGS)
    assert (result.status.phase, result.status.reason) == (Phase.FAILED, "DeadlineExceeded")
    assert [d.reason for d in result.delete] == ["DeadlineExceeded"]

    finished = (NOW - timedelta(seconds=100)).strftime("%Y-%m-%dT%H:%M:%SZ")
    done = {"phase": "Succeeded", "attempts": 1, "completionTime": finished}
    assert plan(
        observe(body(spec={"ttlSecondsAfterFinished": 100}, status=done)), SETTINGS
    ).delete_resource
    assert not plan(
        observe(body(spec={"ttlSecondsAfterFinished": 101}, status=done)), SETTINGS
    ).delete_resource


def test_evaluations_start_after_success_and_collect_their_result():
    from model_trainer.api import EvalMetrics
    from model_trainer.protocol import EvaluationReport

    spec = {"evaluations": [{"name": "train-split", "split": "train"}]}
    done = {"phase": "Succeeded", "attempts": 1}
    raw = body(TRAINING_RUN, spec=spec, status=done)
    first = plan(observe(raw, kind=TRAINING_RUN), SETTINGS)
    assert first.create == [CreatePod(1, evaluation="train-split")]
    assert first.status.phase == Phase.SUCCEEDED
    started = first.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    metrics = EvalMetrics(loss=2.0, perplexity=7.39, bits_per_byte=1.5, tokens=100)
    obs = observe(
        body(TRAINING_RUN, spec=spec, status=started),
        kind=TRAINING_RUN,
        pods=[pod(phase="Succeeded", exit_code=0, evaluation="train-split")],
    )
    obs.evaluations["train-split"] = EvaluationReport(
        phase=Phase.SUCCEEDED, metrics=metrics, path="eval/train-split/metrics.json", attempt=1
    )
    result = plan(obs, SETTINGS)
    assert isinstance(result.status, TrainingRunStatus)
    evaluation = result.status.evaluations[0]
    assert (evaluation.phase, evaluation.metrics) == (Phase.SUCCEEDED, metrics)
    assert result.create == []


def test_pod_names_are_deterministic_and_the_manifest_is_locked_down():
    resource = parse_resource(TRAINING_RUN, body(TRAINING_RUN, spec={"image": "mine:1"}), NOW)
    assert pod_name(resource, 2) == "job-0123abcd-2"
    assert pod_name(resource, 1, "holdout") == "job-0123abcd-e-holdout-1"
    long = parse_resource(
        TOKENIZER_JOB, {**body(), "metadata": {**body()["metadata"], "name": "x" * 200}}, NOW
    )
    assert len(pod_name(long, 10)) <= 63
    manifest = pod_manifest(resource, SETTINGS, 2)
    spec = manifest["spec"]
    assert isinstance(spec, dict)
    container = spec["containers"][0]
    assert container["image"] == "mine:1"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["restartPolicy"] == "Never"
    view = pod_view(manifest)
    assert view is not None
    assert (view.attempt, view.owner_uid, view.phase) == (2, resource.uid, "Pending")


def test_phase_tracker_counts_jobs_by_phase_and_times_known_phases():
    from prometheus_client import REGISTRY

    from model_trainer_operator.metrics import PhaseTracker

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    kind = "TrackerTestKind"
    tracker = PhaseTracker()
    tracker.observe("a", kind, "Pending", now=100.0, first_since=90.0)
    tracker.observe("b", kind, "Running", now=100.0)  # first seen mid-run: start unknown
    assert value("modeltrainer_jobs", kind=kind, phase="Pending") == 1
    tracker.observe("a", kind, "Running", now=105.0)
    tracker.observe("b", kind, "Succeeded", now=130.0)
    tracker.observe("a", kind, "Succeeded", now=145.0)
    assert value("modeltrainer_jobs", kind=kind, phase="Succeeded") == 2
    assert value("modeltrainer_jobs", kind=kind, phase="Running") == 0
    pending = "modeltrainer_phase_duration_seconds_sum"
    assert value(pending, kind=kind, phase="Pending") == 15.0
    assert value(pending, kind=kind, phase="Running") == 40.0  # a's 40 s; b's is unknown
    assert value("modeltrainer_phase_duration_seconds_count", kind=kind, phase="Running") == 1
    tracker.forget("a")
    assert value("modeltrainer_jobs", kind=kind, phase="Succeeded") == 1


def test_a_pod_of_unknown_phase_keeps_running_until_its_heartbeat_is_lost():
    raw = body(spec={"backoffLimit": 0}, status=running_status())
    started = NOW - timedelta(seconds=300)
    alive = snapshot(heartbeat=NOW - timedelta(seconds=1))
    result = plan(observe(raw, [pod(phase="Unknown", started=started)], alive), SETTINGS)
    assert result.status.phase == Phase.RUNNING
    silent = snapshot(heartbeat=NOW - timedelta(seconds=200))
    failed = plan(observe(raw, [pod(phase="Unknown", started=started)], silent), SETTINGS)
    assert (failed.status.phase, failed.status.reason) == (Phase.FAILED, "HeartbeatLost")
