"""The trainer's side of the Redis protocol: the only place the trainer talks to Redis.

Training code calls the reporter from its own thread; those calls only update memory. A daemon
thread does all the Redis I/O: heartbeats, flushing state/progress/eval/stats, and polling the
cancel key. When Redis is unreachable training goes on; the thread retries with backoff and, once
Redis answers again, writes everything anew (a restarted Redis may have lost every key).

An evaluation pod reports through `EvaluationReporter` instead: a handful of synchronous writes.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import redis

from model_trainer import log, protocol
from model_trainer.api.common import ArtifactsStatus, EvalMetrics, Phase, Progress
from model_trainer.api.tokenizer_job import TokenizerStats

logger = log.get_logger(__name__)

DEFAULT_CLOSE_TIMEOUT_SECONDS = 5.0
DEFAULT_BACKOFF_INITIAL_SECONDS = 0.5
DEFAULT_BACKOFF_MAX_SECONDS = 10.0

_Item = protocol.RunState | Progress | EvalMetrics | TokenizerStats


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


class RedisReporter:
    """A `Reporter` that publishes a run's heartbeat, state, progress, eval and stats to Redis.

    Phase changes, artifacts, evaluations and stats are queued in order and flushed promptly;
    progress is coalesced (only the newest is sent) and flushed with each heartbeat.
    """

    def __init__(
        self,
        url: str,
        uid: str,
        *,
        heartbeat_interval: float = protocol.DEFAULT_HEARTBEAT_INTERVAL_SECONDS,
        cancel_poll_interval: float = 0.5,
        attempt: int = 0,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_SECONDS,
        backoff_max: float = DEFAULT_BACKOFF_MAX_SECONDS,
    ) -> None:
        protocol.keys_for(uid)  # rejects an invalid uid now, not in the thread
        if heartbeat_interval <= 0 or cancel_poll_interval <= 0:
            raise ValueError("heartbeat_interval and cancel_poll_interval must be positive")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.uid = uid
        self.attempt = attempt
        self.heartbeat_interval = heartbeat_interval
        self.cancel_poll_interval = cancel_poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._redis_label = redact_url(url)
        self._client = protocol.connect(url)
        self._cancel = threading.Event()
        self._random = random.Random()
        self._cond = threading.Condition(threading.Lock())

        # Guarded by _cond: what training reported.
        self._phase: Phase | None = None
        self._reason = ""
        self._message = ""
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._artifacts: ArtifactsStatus | None = None
        self._latest_state: protocol.RunState | None = None
        self._latest_progress: Progress | None = None
        self._latest_eval: EvalMetrics | None = None
        self._latest_stats: TokenizerStats | None = None
        self._pending: deque[_Item] = deque()
        self._urgent = False
        self._closing = False
        self._close_deadline = 0.0

        self._retry_at = 0.0

        # Owned by the thread.
        self._next_heartbeat = 0.0
        self._next_cancel_poll = 0.0
        self._outage_since: float | None = None
        self._backoff = backoff_initial

        self._thread = threading.Thread(target=self._run, name=f"redis-reporter-{uid}", daemon=True)
        self._thread.start()

    # Reporter protocol: called from the training thread; memory only, never Redis.

    def phase(self, phase: Phase, message: str = "", reason: str = "") -> None:
        now = time.time()
        with self._cond:
            self._phase = phase
            self._message = message
            self._reason = reason
            if phase is Phase.RUNNING and self._started_at is None:
                self._started_at = now
            if phase.finished and self._finished_at is None:
                self._finished_at = now
            self._enqueue_state_locked()

    def progress(self, progress: Progress) -> None:
        with self._cond:
            self._latest_progress = progress
            if self._pending and isinstance(self._pending[-1], Progress):
                self._pending[-1] = progress
            else:
                self._pending.append(progress)

    def eval(self, metrics: EvalMetrics) -> None:
        with self._cond:
            self._latest_eval = metrics
            self._pending.append(metrics)
            self._wake_locked()

    def stats(self, stats: TokenizerStats) -> None:
        with self._cond:
            self._latest_stats = stats
            self._pending.append(stats)
            self._wake_locked()

    def artifacts(self, artifacts: ArtifactsStatus) -> None:
        with self._cond:
            self._artifacts = artifacts
            if self._phase is not None:
                self._enqueue_state_locked()

    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def cancel_event(self) -> threading.Event:
        """Set once Redis says the run should stop."""
        return self._cancel

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_SECONDS) -> None:
        """Flush what is pending, retrying for up to `timeout` seconds, then stop the thread."""
        with self._cond:
            if not self._closing:
                self._closing = True
                now = time.monotonic()
                self._close_deadline = now + timeout
                self._retry_at = min(self._retry_at, now)  # no waiting out a long backoff
                self._wake_locked()
        # The margin covers one Redis call already under way when the deadline passed.
        self._thread.join(timeout + 0.5)
        if not self._thread.is_alive():
            self._client.close()

    def __enter__(self) -> RedisReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _enqueue_state_locked(self) -> None:
        if self._phase is None:
            return
        state = protocol.RunState(
            phase=self._phase,
            reason=self._reason,
            message=self._message,
            started_at=self._started_at,
            finished_at=self._finished_at,
            artifacts=self._artifacts,
            attempt=self.attempt,
        )
        self._latest_state = state
        self._pending.append(state)
        self._wake_locked()

    def _wake_locked(self) -> None:
        self._urgent = True
        self._cond.notify()

    # The thread.

    def _run(self) -> None:
        while True:
            if not self._wait_for_work():
                return
            resync = self._outage_since is not None
            try:
                self._cycle(resync)
            except (redis.RedisError, OSError) as exc:
                self._on_failure(exc)
            except Exception as exc:
                # A bug, not an outage; keep heartbeating rather than die silently.
                logger.exception("redis_reporter_failed", uid=self.uid)
                self._on_failure(exc)
            else:
                if resync:
                    self._on_recovery()
                with self._cond:
                    if self._closing and not self._pending:
                        return

    def _wait_for_work(self) -> bool:
        """Sleep until something is due. False once closing has run out of time."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._closing:
                    if now >= self._close_deadline:
                        if self._pending or self._outage_since is not None:
                            logger.warning(
                                "redis_flush_abandoned",
                                uid=self.uid,
                                pending=len(self._pending),
                                redis=self._redis_label,
                            )
                        return False
                    wake_at = self._retry_at if self._outage_since is not None else now
                    wake_at = min(wake_at, self._close_deadline)
                elif self._outage_since is not None:
                    wake_at = self._retry_at
                elif self._urgent:
                    wake_at = now
                else:
                    wake_at = self._next_heartbeat
                    if not self._cancel.is_set():
                        wake_at = min(wake_at, self._next_cancel_poll)
                if now >= wake_at:
                    self._urgent = False
                    return True
                self._cond.wait(wake_at - now)

    def _cycle(self, resync: bool) -> None:
        written = self._flush_pending()
        if resync:
            with self._cond:
                latest: list[_Item | None] = [
                    self._latest_state,
                    self._latest_progress,
                    self._latest_eval,
                    self._latest_stats,
                ]
            for item in latest:
                if item is not None and type(item) not in written:
                    self._write(item)
        now = time.monotonic()
        if resync or now >= self._next_heartbeat:
            protocol.write_heartbeat(self._client, self.uid)
            self._next_heartbeat = now + self.heartbeat_interval
        if not self._cancel.is_set() and (resync or now >= self._next_cancel_poll):
            if protocol.cancel_requested(self._client, self.uid):
                logger.info("cancel_requested", uid=self.uid, source="redis")
                self._cancel.set()
            self._next_cancel_poll = now + self.cancel_poll_interval

    def _flush_pending(self) -> set[type]:
        written: set[type] = set()
        while True:
            with self._cond:
                if not self._pending:
                    return written
                item = self._pending.popleft()
            try:
                self._write(item)
            except BaseException:
                with self._cond:
                    self._pending.appendleft(item)
                raise
            written.add(type(item))

    def _write(self, item: _Item) -> None:
        if isinstance(item, protocol.RunState):
            protocol.write_state(self._client, self.uid, item)
        elif isinstance(item, Progress):
            protocol.write_progress(self._client, self.uid, item)
        elif isinstance(item, TokenizerStats):
            protocol.write_stats(self._client, self.uid, item)
        else:
            protocol.write_eval(self._client, self.uid, item)

    def _on_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self._backoff = self.backoff_initial
            logger.warning(
                "redis_unreachable",
                uid=self.uid,
                redis=self._redis_label,
                error=f"{type(exc).__name__}: {exc}",
            )
        else:
            self._backoff = min(self._backoff * 2, self.backoff_max)
        with self._cond:
            # While closing, retry quickly: the deadline bounds the attempts.
            delay = min(self._backoff, self.backoff_initial) if self._closing else self._backoff
            self._retry_at = now + delay * self._random.uniform(0.5, 1.0)

    def _on_recovery(self) -> None:
        if self._outage_since is None:
            return
        outage = time.monotonic() - self._outage_since
        self._outage_since = None
        self._backoff = self.backoff_initial
        logger.info(
            "redis_reconnected",
            uid=self.uid,
            redis=self._redis_label,
            outage_seconds=round(outage, 3),
        )


class EvaluationReporter:
    """Publishes the EvaluationReport of one of a run's spec.evaluations.

    An evaluation pod has nothing else to do while it reports, so writes are synchronous. A
    failed write never fails the evaluation: it logs one warning, the newest report is kept,
    and `close` retries it briefly.
    """

    def __init__(
        self,
        url: str,
        uid: str,
        name: str,
        *,
        attempt: int = 0,
        backoff_initial: float = DEFAULT_BACKOFF_INITIAL_SECONDS,
        backoff_max: float = DEFAULT_BACKOFF_MAX_SECONDS,
    ) -> None:
        protocol.keys_for(uid).evaluation(name)  # rejects an invalid uid or name now
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.uid = uid
        self.name = name
        self.attempt = attempt
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._redis_label = redact_url(url)
        self._client = protocol.connect(url)
        self._pending: protocol.EvaluationReport | None = None
        self._outage_since: float | None = None
        self._closed = False

    def report(
        self,
        phase: Phase,
        *,
        reason: str = "",
        message: str = "",
        metrics: EvalMetrics | None = None,
        path: str | None = None,
    ) -> None:
        self._pending = protocol.EvaluationReport(
            phase=phase,
            reason=reason,
            message=message,
            metrics=metrics,
            path=path,
            attempt=self.attempt,
        )
        # During an outage each try may block for the client's timeout: leave it to close().
        if self._outage_since is None and not self._closed:
            self._flush()

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_SECONDS) -> None:
        """Write the pending report, retrying for up to `timeout` seconds."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        backoff = self.backoff_initial
        while self._pending is not None and not self._flush():
            delay = min(backoff, deadline - time.monotonic())
            if delay <= 0:
                break
            time.sleep(delay)
            backoff = min(backoff * 2, self.backoff_max)
        if self._pending is not None:
            logger.warning(
                "redis_flush_abandoned",
                uid=self.uid,
                evaluation=self.name,
                phase=self._pending.phase.value,
                redis=self._redis_label,
            )
        self._client.close()

    def __enter__(self) -> EvaluationReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _flush(self) -> bool:
        report = self._pending
        if report is None:
            return True
        try:
            protocol.write_evaluation(self._client, self.uid, self.name, report)
        except (redis.RedisError, OSError) as exc:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                logger.warning(
                    "redis_unreachable",
                    uid=self.uid,
                    evaluation=self.name,
                    redis=self._redis_label,
                    error=f"{type(exc).__name__}: {exc}",
                )
            return False
        self._pending = None
        if self._outage_since is not None:
            logger.info(
                "redis_reconnected",
                uid=self.uid,
                evaluation=self.name,
                redis=self._redis_label,
                outage_seconds=round(time.monotonic() - self._outage_since, 3),
            )
            self._outage_since = None
        return True
