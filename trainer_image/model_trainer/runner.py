"""Run one job to its end: phases, job log, error mapping and exit codes. Shared by local mode
and the trainer pod."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from model_trainer import log
from model_trainer.api import EvalMetrics, Phase, TokenizerJob, TrainingRun
from model_trainer.api.tokenizer_job import TokenizerStats
from model_trainer.artifacts import (
    CHECKPOINTS_DIR,
    LOGS_NAME,
    TOKENIZER_FILE,
    job_dir,
    output_files,
)
from model_trainer.corpus import CorpusContext
from model_trainer.errors import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    JobCancelled,
    TokenizerNotFoundError,
    TrainerError,
)
from model_trainer.reporting import Reporter
from model_trainer.resources import Resource

logger = log.get_logger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    kind: str
    name: str
    phase: Phase
    exit_code: int
    out_dir: Path
    reason: str = ""
    message: str = ""
    duration_seconds: float = 0.0
    eval: EvalMetrics | None = None
    stats: TokenizerStats | None = None
    files: list[str] = field(default_factory=list)


def tokenizer_path(artifacts_root: Path, run: TrainingRun) -> Path:
    ref_dir = job_dir(
        artifacts_root, run.metadata.namespace, "TokenizerJob", run.spec.tokenizer_ref.name
    )
    return ref_dir / TOKENIZER_FILE


def run_job(
    resource: Resource, artifacts_root: Path, ctx: CorpusContext, reporter: Reporter
) -> JobOutcome:
    meta = resource.metadata
    out_dir = job_dir(artifacts_root, meta.namespace, resource.kind, meta.name)
    started = time.monotonic()

    def outcome(
        phase: Phase,
        exit_code: int,
        reason: str = "",
        message: str = "",
        metrics: EvalMetrics | None = None,
        stats: TokenizerStats | None = None,
    ) -> JobOutcome:
        files = output_files(out_dir) if out_dir.is_dir() else []
        if (out_dir / CHECKPOINTS_DIR).is_dir():
            files.append(f"{CHECKPOINTS_DIR}/")
        return JobOutcome(
            kind=resource.kind,
            name=meta.name,
            phase=phase,
            exit_code=exit_code,
            out_dir=out_dir,
            reason=reason,
            message=message,
            duration_seconds=time.monotonic() - started,
            eval=metrics,
            stats=stats,
            files=files,
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    with (
        log.job_log(out_dir / LOGS_NAME),
        log.bound(kind=resource.kind, name=meta.name, namespace=meta.namespace, uid=meta.uid or ""),
    ):
        reporter.phase(Phase.RUNNING, "training started")
        logger.info("job_started", out_dir=str(out_dir))
        try:
            if resource.spec.cancel:
                raise JobCancelled()
            if isinstance(resource, TokenizerJob):
                from model_trainer.tokenizer import train_tokenizer

                result = train_tokenizer(resource, out_dir, ctx, reporter)
                reporter.stats(result.stats)
                done = outcome(
                    Phase.SUCCEEDED,
                    EXIT_SUCCEEDED,
                    "Succeeded",
                    f"tokenizer trained: {result.stats.vocab_size} tokens, "
                    f"{result.stats.bytes_per_token:.2f} bytes/token",
                    stats=result.stats,
                )
            else:
                from model_trainer.lm import train_model

                tok = tokenizer_path(artifacts_root, resource)
                if not tok.is_file():
                    raise TokenizerNotFoundError(
                        f"tokenizer of TokenizerJob {resource.spec.tokenizer_ref.name!r} not "
                        f"found at {tok}: run that TokenizerJob first"
                    )
                trained = train_model(resource, out_dir, tok, ctx, reporter)
                done = outcome(
                    Phase.SUCCEEDED,
                    EXIT_SUCCEEDED,
                    "Succeeded",
                    f"trained {trained.steps} steps, eval loss {trained.final_eval.loss:.4f}",
                    metrics=trained.final_eval,
                )
        except JobCancelled:
            logger.warning("job_cancelled")
            reporter.phase(Phase.CANCELLED, "cancelled on request; artifacts kept", "Cancelled")
            return outcome(Phase.CANCELLED, EXIT_CANCELLED, "Cancelled", "cancelled on request")
        except TrainerError as exc:
            logger.error("job_failed", reason=exc.reason, error=exc.message)
            reporter.phase(Phase.FAILED, exc.message, exc.reason)
            return outcome(Phase.FAILED, exc.exit_code, exc.reason, exc.message)
        except Exception as exc:  # the last line of defence: report, never crash silently
            logger.exception("job_crashed", error=str(exc))
            reporter.phase(Phase.FAILED, f"internal error: {exc}", "InternalError")
            return outcome(Phase.FAILED, EXIT_FAILED, "InternalError", str(exc))
        logger.info(
            "job_succeeded", message=done.message, duration_seconds=round(done.duration_seconds, 3)
        )
        reporter.phase(Phase.SUCCEEDED, done.message, "Succeeded")
        return done
