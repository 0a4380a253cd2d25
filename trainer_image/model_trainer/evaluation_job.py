"""The evaluation pod: one entry of a Succeeded TrainingRun's spec.evaluations.

It reads the finished model in the run's artifacts directory and writes only under
eval/<name>/ there (metrics.json and logs.jsonl): the model, the checkpoints and the run's
manifest.json are never touched. It reports through Redis with `protocol.write_evaluation`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from model_trainer import artifacts, log
from model_trainer.api import EvalMetrics, EvaluationRequest, Phase, TrainingRun
from model_trainer.artifacts import (
    LOGS_NAME,
    MODEL_FILES,
    TOKENIZER_FILE,
    evaluation_metrics_path,
    job_dir,
)
from model_trainer.corpus import CorpusContext
from model_trainer.errors import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    InvalidInputError,
    JobCancelled,
    TrainerError,
)
from model_trainer.pod import parse_pod_resource, pod_corpus_context

logger = log.get_logger(__name__)

# What lm.evaluate needs; checked here so that a missing model fails before torch is imported.
REQUIRED_FILES = (*MODEL_FILES, TOKENIZER_FILE)


class ModelNotFoundError(InvalidInputError):
    reason = "ModelNotFound"


@dataclass(frozen=True)
class EvaluationOutcome:
    run: str
    name: str
    phase: Phase
    exit_code: int
    reason: str
    message: str
    duration_seconds: float = 0.0
    metrics: EvalMetrics | None = None
    path: str | None = None


def find_request(run: TrainingRun, name: str) -> EvaluationRequest:
    for request in run.spec.evaluations:
        if request.name == name:
            return request
    known = ", ".join(repr(r.name) for r in run.spec.evaluations) or "none"
    raise InvalidInputError(
        f"TrainingRun {run.metadata.name} has no evaluation named {name!r} in "
        f"spec.evaluations (it has: {known})"
    )


_Handler = Callable[[int, FrameType | None], object] | int


class _Cancellation:
    """SIGTERM and SIGINT cancel the evaluation. evaluate_run_dir has no cancel hook, and it
    writes nothing, so while it runs the signal raises JobCancelled at once; outside that
    window it only sets a flag."""

    def __init__(self) -> None:
        self.requested = False
        self._armed = False
        self._saved: list[tuple[signal.Signals, _Handler]] = []

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if previous is not None:
                self._saved.append((sig, previous))
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._saved:
            signal.signal(sig, previous)
        self._saved.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.requested = True
        if self._armed:
            self._armed = False
            raise JobCancelled(f"received signal {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        if self.requested:
            raise JobCancelled("cancelled before the evaluation started")
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


class _Reporter:
    """The Redis reporter, or nothing when MT_REDIS_URL is unset."""

    def __init__(self, redis_url: str | None, uid: str, name: str, attempt: int) -> None:
        if redis_url:
            from model_trainer.redis_reporter import EvaluationReporter

            self._redis: EvaluationReporter | None = EvaluationReporter(
                redis_url, uid, name, attempt=attempt
            )
        else:
            self._redis = None
            logger.warning("no_redis", detail="MT_REDIS_URL unset: no status reporting")

    def report(
        self,
        phase: Phase,
        reason: str = "",
        message: str = "",
        metrics: EvalMetrics | None = None,
        path: str | None = None,
    ) -> None:
        if self._redis is not None:
            self._redis.report(phase, reason=reason, message=message, metrics=metrics, path=path)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def run_evaluation_pod(
    resource_text: str,
    name: str,
    *,
    artifacts_root: Path,
    redis_url: str | None,
    config_map_dir: Path | None,
    attempt: int = 0,
) -> EvaluationOutcome:
    """Run evaluation `name` of the TrainingRun in `resource_text`. Input that names no
    evaluation of a TrainingRun raises InvalidInputError before anything is written."""
    cancellation = _Cancellation()
    cancellation.install()
    try:
        resource, uid = parse_pod_resource(resource_text)
        if not isinstance(resource, TrainingRun):
            raise InvalidInputError(f"an evaluation needs a TrainingRun, not a {resource.kind}")
        request = find_request(resource, name)
        reporter = _Reporter(redis_url, uid, name, attempt)
        try:
            return _evaluate(
                resource,
                uid,
                request,
                artifacts_root,
                pod_corpus_context(artifacts_root, config_map_dir),
                reporter,
                cancellation,
            )
        finally:
            reporter.close()
    finally:
        cancellation.restore()


def _evaluate(
    run: TrainingRun,
    uid: str,
    request: EvaluationRequest,
    artifacts_root: Path,
    ctx: CorpusContext,
    reporter: _Reporter,
    cancellation: _Cancellation,
) -> EvaluationOutcome:
    meta = run.metadata
    run_dir = job_dir(artifacts_root, meta.namespace, "TrainingRun", meta.name)
    rel_path = evaluation_metrics_path(request.name)
    metrics_file = run_dir / rel_path
    eval_dir = metrics_file.parent
    corpus = request.corpus or run.spec.corpus
    started = time.monotonic()

    def ended(
        phase: Phase,
        exit_code: int,
        reason: str,
        message: str,
        metrics: EvalMetrics | None = None,
        path: str | None = None,
    ) -> EvaluationOutcome:
        reporter.report(phase, reason, message, metrics=metrics, path=path)
        return EvaluationOutcome(
            run=meta.name,
            name=request.name,
            phase=phase,
            exit_code=exit_code,
            reason=reason,
            message=message,
            duration_seconds=time.monotonic() - started,
            metrics=metrics,
            path=path,
        )

    with (
        contextlib.ExitStack() as stack,
        log.bound(
            kind=run.kind,
            name=meta.name,
            namespace=meta.namespace,
            uid=uid,
            evaluation=request.name,
        ),
    ):
        try:
            _check_model(run_dir, meta.name)
            _open_job_log(stack, eval_dir / LOGS_NAME)
            _retire(metrics_file)
            reporter.report(
                Phase.RUNNING, "Started", f"evaluating on {corpus.describe()} ({request.split})"
            )
            logger.info(
                "evaluation_started",
                run_dir=str(run_dir),
                corpus=corpus.describe(),
                split=request.split,
                holdout_fraction=run.spec.holdout_fraction,
                max_tokens=request.max_tokens,
            )
            with cancellation.raising():
                from model_trainer.lm import evaluate_run_dir

                metrics = evaluate_run_dir(
                    run_dir,
                    corpus,
                    ctx,
                    request.split,
                    run.spec.holdout_fraction,
                    max_tokens=request.max_tokens,
                )
            artifacts.atomic_write_json(
                metrics_file, metrics.model_dump(mode="json", by_alias=True)
            )
        except JobCancelled:
            logger.warning("evaluation_cancelled")
            return ended(Phase.CANCELLED, EXIT_CANCELLED, "Cancelled", "cancelled on request")
        except TrainerError as exc:
            logger.error("evaluation_failed", reason=exc.reason, error=exc.message)
            return ended(Phase.FAILED, exc.exit_code, exc.reason, exc.message)
        except Exception as exc:  # the last line of defence: report, never crash silently
            logger.exception("evaluation_crashed", error=str(exc))
            return ended(Phase.FAILED, EXIT_FAILED, "InternalError", f"internal error: {exc}")
        message = (
            f"loss {metrics.loss:.4f}, bits/byte {metrics.bits_per_byte:.4f} "
            f"on {metrics.tokens} tokens"
        )
        logger.info(
            "evaluation_succeeded",
            path=rel_path,
            message=message,
            duration_seconds=round(time.monotonic() - started, 3),
        )
        return ended(
            Phase.SUCCEEDED, EXIT_SUCCEEDED, "Succeeded", message, metrics=metrics, path=rel_path
        )


def _check_model(run_dir: Path, run_name: str) -> None:
    missing = [name for name in REQUIRED_FILES if not (run_dir / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"TrainingRun {run_name} has no finished model in {run_dir} "
            f"({', '.join(missing)} missing): evaluations need a Succeeded run"
        )


def _open_job_log(stack: contextlib.ExitStack[bool | None], path: Path) -> None:
    try:
        stack.enter_context(log.job_log(path))
    except OSError as exc:
        raise artifacts.write_error(path, exc) from exc


def _retire(path: Path) -> None:
    """Remove the metrics of an earlier attempt, so that a failure now never shows them."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise artifacts.write_error(path, exc) from exc
