"""RedisReporter against a real redis-server, including one that goes away and comes back."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import redis
from structlog.testing import capture_logs

from model_trainer import protocol
from model_trainer.api.common import ArtifactsStatus, EvalMetrics, Phase, Progress
from model_trainer.api.tokenizer_job import TokenizerStats
from model_trainer.redis_reporter import EvaluationReporter, RedisReporter, redact_url
from redis_server import RedisServer

T = TypeVar("T")


def fast_reporter(
    url: str, uid: str, *, backoff_initial: float = 0.5, backoff_max: float = 10.0
) -> RedisReporter:
    """A reporter with 0.1 s heartbeat and cancel-poll intervals, so tests run fast."""
    return RedisReporter(
        url,
        uid,
        heartbeat_interval=0.1,
        cancel_poll_interval=0.1,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )


def new_uid() -> str:
    return str(uuid.uuid4())


def wait_for(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def step(n: int, total: int = 1000) -> Progress:
    return Progress(step=n, total_steps=total, percent=n * 100 // total, loss=5.0 - n / total)


STATS = TokenizerStats(
    vocab_size=320,
    holdout_bytes=6000,
    holdout_tokens=2400,
    bytes_per_token=2.5,
    unknown_rate=0.0,
    character_coverage=1.0,
    vocab_used_fraction=0.75,
)


@pytest.fixture
def reporters() -> Iterator[list[RedisReporter]]:
    """Reporters made by a test; closed (briefly) even when the test fails."""
    made: list[RedisReporter] = []
    yield made
    for reporter in made:
        reporter.close(timeout=0.5)


def test_heartbeats_keep_coming_while_the_main_thread_is_busy(
    redis_server: RedisServer, redis_client: redis.Redis, reporters: list[RedisReporter]
) -> None:
    uid = new_uid()
    reporter = fast_reporter(redis_server.url, uid)
    reporters.append(reporter)
    reporter.phase(Phase.RUNNING)

    seen: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        watcher = redis_server.client()
        while not stop.is_set():
            beat = protocol.read_run(watcher, uid).heartbeat
            if beat is not None and (not seen or beat != seen[-1]):
                seen.append(beat)
            time.sleep(0.02)
        watcher.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    # One slow training step: pure Python holding the GIL, then a blocking sleep.
    busy_until = time.monotonic() + 0.8
    total = 0
    while time.monotonic() < busy_until:
        total += sum(range(1000))
    time.sleep(0.8)
    stop.set()
    watcher.join()

    assert total > 0
    # 1.6 s at 0.1 s intervals: expect ~16 distinct heartbeats; demand well over half.
    assert len(seen) >= 10, seen
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(gaps) < 0.5, gaps
    assert abs(seen[-1] - time.time()) < 1.0


def test_progress_is_coalesced_and_the_newest_wins(
    redis_server: RedisServer, redis_client: redis.Redis, reporters: list[RedisReporter]
) -> None:
    uid = new_uid()
    pubsub = redis_client.pubsub()
    pubsub.subscribe(protocol.keys_for(uid).events)
    assert isinstance(pubsub.get_message(timeout=2.0), dict)  # subscription confirmed

    reporter = RedisReporter(redis_server.url, uid, heartbeat_interval=0.2)
    reporters.append(reporter)
    for n in range(1, 1001):
        reporter.progress(step(n))
    reporter.close()

    steps: list[int] = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        if message["type"] == "message":
            event = protocol.RunEvent.model_validate_json(message["data"])
            assert event.type == "progress"
            assert event.progress is not None
            steps.append(event.progress.step)
    pubsub.close()

    assert steps, "no progress event was published"
    assert steps[-1] == 1000
    assert steps == sorted(steps)
    assert len(steps) <= 5, steps
    assert protocol.read_run(redis_client, uid).progress == step(1000)


def test_phase_changes_are_flushed_promptly_in_order(
    redis_server: RedisServer, redis_client: redis.Redis, reporters: list[RedisReporter]
) -> None:
    uid = new_uid()
    pubsub = redis_client.pubsub()
    pubsub.subscribe(protocol.keys_for(uid).events)
    assert isinstance(pubsub.get_message(timeout=2.0), dict)

    # Intervals far longer than the test: only the prompt flush can deliver.
    reporter = RedisReporter(
        redis_server.url, uid, heartbeat_interval=60.0, cancel_poll_interval=60.0, attempt=3
    )
    reporters.append(reporter)
    time.sleep(0.2)  # past the first heartbeat and cancel poll
    reporter.phase(Phase.RUNNING, "training started", "Started")

    def running() -> protocol.RunState | None:
        state = protocol.read_run(redis_client, uid).state
        return state if state is not None and state.phase is Phase.RUNNING else None

    state = wait_for(running, 0.5, "the Running state")
    assert state.attempt == 3
    assert state.started_at is not None
    assert state.finished_at is None

    reporter.progress(step(10))
    metrics = EvalMetrics(loss=2.0, perplexity=7.39, bits_per_byte=1.5, tokens=100, step=10)
    reporter.eval(metrics)
    artifacts = ArtifactsStatus(path="ns/TrainingRun/demo", manifest_sha256="b" * 64)
    reporter.artifacts(artifacts)
    reporter.progress(step(20))
    reporter.stats(STATS)
    reporter.phase(Phase.SUCCEEDED, "done", "Succeeded")
    reporter.close()

    kinds: list[str] = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        if message["type"] == "message":
            event = protocol.RunEvent.model_validate_json(message["data"])
            kinds.append(event.type if event.state is None else f"state:{event.state.phase}")
    pubsub.close()
    assert kinds == [
        "state:Running",
        "progress",
        "eval",
        "state:Running",  # the artifacts update
        "progress",
        "stats",
        "state:Succeeded",
    ]

    snapshot = protocol.read_run(redis_client, uid)
    assert snapshot.state is not None
    assert snapshot.state.phase is Phase.SUCCEEDED
    assert (snapshot.state.reason, snapshot.state.message) == ("Succeeded", "done")
    assert snapshot.state.started_at == state.started_at
    assert snapshot.state.finished_at is not None
    assert snapshot.state.finished_at >= state.started_at
    assert snapshot.state.artifacts == artifacts
    assert snapshot.progress == step(20)
    assert snapshot.eval == metrics
    assert snapshot.stats == STATS


def test_close_flushes_pending_progress(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    uid = new_uid()
    reporter = RedisReporter(
        redis_server.url, uid, heartbeat_interval=60.0, cancel_poll_interval=60.0
    )
    time.sleep(0.2)  # past the first heartbeat and cancel poll; the next are a minute away
    reporter.progress(step(42))
    reporter.close()
    assert protocol.read_run(redis_client, uid).progress == step(42)


def test_cancel_set_in_redis_is_seen_within_a_second(
    redis_server: RedisServer, redis_client: redis.Redis, reporters: list[RedisReporter]
) -> None:
    uid = new_uid()
    reporter = RedisReporter(
        redis_server.url, uid, heartbeat_interval=0.5, cancel_poll_interval=0.2
    )
    reporters.append(reporter)
    time.sleep(0.3)
    assert reporter.cancel_requested() is False

    protocol.request_cancel(redis_client, uid)
    requested_at = time.monotonic()
    wait_for(lambda: True if reporter.cancel_requested() else None, 1.0, "cancellation")
    assert time.monotonic() - requested_at < 1.0
    assert reporter.cancel_event.is_set()


def test_cancel_of_another_run_is_ignored(
    redis_server: RedisServer, redis_client: redis.Redis, reporters: list[RedisReporter]
) -> None:
    uid = new_uid()
    reporter = fast_reporter(redis_server.url, uid)
    reporters.append(reporter)
    protocol.request_cancel(redis_client, new_uid())
    time.sleep(0.4)
    assert reporter.cancel_requested() is False


def timed(call: Callable[..., None], *args: object) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def test_outage_and_catch_up(private_redis_server: RedisServer) -> None:
    server = private_redis_server
    uid = new_uid()
    client = server.client()
    reporter = fast_reporter(server.url, uid, backoff_initial=0.1, backoff_max=0.4)
    try:
        reporter.phase(Phase.RUNNING, "training started")
        reporter.progress(step(1))
        last_eval = EvalMetrics(loss=1.5, perplexity=4.48, bits_per_byte=1.2, tokens=64, step=1)
        reporter.eval(last_eval)
        wait_for(
            lambda: True if protocol.read_run(client, uid).progress == step(1) else None,
            2.0,
            "the first progress",
        )

        with capture_logs() as logs:
            server.stop()
            durations: list[float] = []
            n = 1
            outage_ends = time.monotonic() + 1.5
            while time.monotonic() < outage_ends:
                n += 1
                durations.append(timed(reporter.progress, step(n)))
                if n % 10 == 0:
                    durations.append(timed(reporter.phase, Phase.RUNNING, f"step {n}"))
                assert reporter.cancel_requested() is False
                time.sleep(0.01)
            last_step, last_message = n, f"step {n - n % 10}"

            warnings = [e for e in logs if e["log_level"] == "warning"]
            assert [e["event"] for e in warnings] == ["redis_unreachable"], logs
            assert "Connection" in str(warnings[0]["error"]), warnings
            assert max(durations) < 0.05, max(durations)

            restarted_at = time.time()
            server.start()

            def caught_up() -> protocol.RunSnapshot | None:
                snapshot = protocol.read_run(client, uid)
                fresh = snapshot.heartbeat is not None and snapshot.heartbeat >= restarted_at
                return snapshot if fresh and snapshot.progress == step(last_step) else None

            snapshot = wait_for(caught_up, 3.0, "the reporter to catch up")
            assert snapshot.state is not None
            assert snapshot.state.phase is Phase.RUNNING
            assert snapshot.state.message == last_message
            assert snapshot.eval == last_eval  # reported before the outage: rewritten

            wait_for(
                lambda: True if any(e["event"] == "redis_reconnected" for e in logs) else None,
                1.0,
                "the redis_reconnected log",
            )
            reconnected = [e for e in logs if e["event"] == "redis_reconnected"]
            assert len(reconnected) == 1
            assert reconnected[0]["log_level"] == "info"
            outage_seconds = reconnected[0]["outage_seconds"]
            assert isinstance(outage_seconds, float)
            assert outage_seconds >= 1.0, reconnected
            assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
                "redis_unreachable"
            ], logs

        # Heartbeats go on after the catch-up.
        beat = snapshot.heartbeat
        wait_for(
            lambda: True if (protocol.read_run(client, uid).heartbeat or 0) > (beat or 0) else None,
            1.0,
            "a later heartbeat",
        )
        reporter.phase(Phase.SUCCEEDED, "done")
        reporter.close()
        final = protocol.read_run(client, uid).state
        assert final is not None
        assert final.phase is Phase.SUCCEEDED
    finally:
        reporter.close(timeout=0.5)
        client.close()


def test_restarted_redis_gets_everything_again(private_redis_server: RedisServer) -> None:
    """A Redis restart loses every key; the reporter writes them anew without being asked."""
    server = private_redis_server
    uid = new_uid()
    client = server.client()
    reporter = fast_reporter(server.url, uid, backoff_initial=0.1, backoff_max=0.2)
    try:
        reporter.phase(Phase.RUNNING, "training started")
        reporter.progress(step(5))
        metrics = EvalMetrics(loss=2.0, perplexity=7.39, bits_per_byte=1.5, step=5)
        reporter.eval(metrics)
        reporter.stats(STATS)
        wait_for(
            lambda: protocol.read_run(client, uid).stats,
            2.0,
            "the first flush",
        )
        server.stop()
        time.sleep(0.3)
        server.start()

        def restored() -> protocol.RunSnapshot | None:
            snapshot = protocol.read_run(client, uid)
            complete = None not in (
                snapshot.state,
                snapshot.progress,
                snapshot.eval,
                snapshot.stats,
            )
            return snapshot if complete and snapshot.heartbeat is not None else None

        snapshot = wait_for(restored, 2.0, "the keys to be written again")
        assert snapshot.state is not None
        assert (snapshot.state.phase, snapshot.state.message) == (Phase.RUNNING, "training started")
        assert snapshot.progress == step(5)
        assert snapshot.eval == metrics
        assert snapshot.stats == STATS
    finally:
        reporter.close(timeout=0.5)
        client.close()


def test_close_with_redis_down_returns_within_its_bound(
    private_redis_server: RedisServer,
) -> None:
    reporter = fast_reporter(private_redis_server.url, new_uid())
    reporter.phase(Phase.RUNNING)
    time.sleep(0.2)
    private_redis_server.stop()
    reporter.phase(Phase.SUCCEEDED, "done")
    with capture_logs() as logs:
        took = timed(lambda: reporter.close(timeout=1.0))
    assert took < 1.6, took
    events = [e["event"] for e in logs]
    assert "redis_flush_abandoned" in events


def test_close_retries_until_redis_comes_back(private_redis_server: RedisServer) -> None:
    server = private_redis_server
    uid = new_uid()
    reporter = fast_reporter(server.url, uid)
    reporter.phase(Phase.RUNNING)
    time.sleep(0.2)
    server.stop()
    reporter.phase(Phase.FAILED, "out of memory", "OOMKilled")
    restarter = threading.Timer(0.6, server.start)
    restarter.start()
    try:
        took = timed(lambda: reporter.close(timeout=4.0))
    finally:
        restarter.join()
    assert took < 4.0
    client = server.client()
    state = protocol.read_run(client, uid).state
    client.close()
    assert state is not None
    assert (state.phase, state.reason) == (Phase.FAILED, "OOMKilled")


def test_unreachable_from_the_start_never_blocks_training() -> None:
    with capture_logs() as logs:
        reporter = fast_reporter("redis://127.0.0.1:1/0", new_uid(), backoff_initial=0.05)
        durations = [timed(lambda: reporter.phase(Phase.RUNNING))]
        for n in range(1, 50):
            durations.append(timed(reporter.progress, step(n)))
            time.sleep(0.01)
        took = timed(lambda: reporter.close(timeout=0.3))
    assert max(durations) < 0.05
    assert took < 1.0
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "redis_unreachable",
        "redis_flush_abandoned",
    ]


def test_invalid_uid_is_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="invalid run uid"):
        RedisReporter("redis://127.0.0.1:1/0", "ns:name")


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert redact_url("redis://:s3cret@redis/1") == "redis://:***@redis/1"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"


# EvaluationReporter: the evaluation pod's synchronous reports.

EVAL_METRICS = EvalMetrics(loss=2.5, perplexity=12.18, bits_per_byte=1.9, tokens=512, step=0)


def test_evaluation_reports_are_written_and_published_in_order(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    uid = new_uid()
    pubsub = redis_client.pubsub()
    pubsub.subscribe(protocol.keys_for(uid).events)
    assert isinstance(pubsub.get_message(timeout=2.0), dict)

    with EvaluationReporter(redis_server.url, uid, "held", attempt=2) as reporter:
        reporter.report(Phase.RUNNING, reason="Started")
        running = protocol.read_evaluations(redis_client, uid, ["held"])["held"]
        assert (running.phase, running.attempt, running.metrics) == (Phase.RUNNING, 2, None)
        reporter.report(
            Phase.SUCCEEDED, reason="Succeeded", metrics=EVAL_METRICS, path="eval/held/metrics.json"
        )

    events = []
    while (message := pubsub.get_message(timeout=0.3)) is not None:
        if message["type"] == "message":
            events.append(protocol.RunEvent.model_validate_json(message["data"]))
    pubsub.close()
    assert [(e.type, e.evaluation.phase if e.evaluation else None) for e in events] == [
        ("evaluation", Phase.RUNNING),
        ("evaluation", Phase.SUCCEEDED),
    ]
    done = protocol.read_evaluations(redis_client, uid, ["held", "other"])
    assert set(done) == {"held"}
    assert done["held"].metrics == EVAL_METRICS
    assert done["held"].path == "eval/held/metrics.json"
    assert protocol.read_run(redis_client, uid).state is None  # the run's own keys are untouched
    assert protocol.delete_run(redis_client, uid) == 1
    assert protocol.read_evaluations(redis_client, uid, ["held"]) == {}


def test_evaluation_report_survives_an_outage(private_redis_server: RedisServer) -> None:
    server = private_redis_server
    uid = new_uid()
    server.stop()
    reporter = EvaluationReporter(server.url, uid, "held", backoff_initial=0.1, backoff_max=0.2)
    with capture_logs() as logs:
        took = timed(lambda: reporter.report(Phase.RUNNING))
        assert took < 1.0, took
        # Later reports during the outage wait for close() instead of trying again.
        took = timed(lambda: reporter.report(Phase.SUCCEEDED, metrics=EVAL_METRICS))
        assert took < 0.05, took
        restarter = threading.Timer(0.5, server.start)
        restarter.start()
        try:
            took = timed(lambda: reporter.close(timeout=4.0))
        finally:
            restarter.join()
    assert took < 4.0, took
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["redis_unreachable"]
    assert "redis_reconnected" in [e["event"] for e in logs]
    client = server.client()
    report = protocol.read_evaluations(client, uid, ["held"])["held"]
    client.close()
    assert (report.phase, report.metrics) == (Phase.SUCCEEDED, EVAL_METRICS)


def test_evaluation_reporter_gives_up_within_its_bound() -> None:
    reporter = EvaluationReporter("redis://127.0.0.1:1/0", new_uid(), "held", backoff_initial=0.05)
    with capture_logs() as logs:
        reporter.report(Phase.RUNNING)
        reporter.report(Phase.FAILED, reason="InvalidCorpus", message="corpus is empty")
        took = timed(lambda: reporter.close(timeout=0.5))
    assert took < 1.0, took
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "redis_unreachable",
        "redis_flush_abandoned",
    ]


def test_invalid_evaluation_name_is_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="invalid evaluation name"):
        EvaluationReporter("redis://127.0.0.1:1/0", new_uid(), "a:b")
