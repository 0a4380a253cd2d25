"""Local mode: run the YAML that the cluster accepts, in dependency order, without a cluster."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from model_trainer import log
from model_trainer.api import Phase, TrainingRun
from model_trainer.console import ConsoleReporter
from model_trainer.corpus import CorpusContext
from model_trainer.errors import EXIT_INVALID_INPUT, EXIT_SUCCEEDED
from model_trainer.reporting import CancelToken, MultiReporter, NullReporter, Reporter
from model_trainer.resources import Documents, Resource, dependency_order, load_documents
from model_trainer.runner import JobOutcome, run_job

logger = log.get_logger(__name__)


def _reporter_for(
    resource: Resource, token: CancelToken, redis_url: str | None, progress_bar: bool | None
) -> Reporter:
    members: list[Reporter] = [
        NullReporter(token),
        ConsoleReporter(f"{resource.kind}/{resource.metadata.name}", enabled=progress_bar),
    ]
    if redis_url is not None and resource.metadata.uid is not None:
        from model_trainer.redis_reporter import RedisReporter

        members.append(RedisReporter(redis_url, resource.metadata.uid))
    return MultiReporter(members)


def run_documents(
    docs: Documents,
    artifacts_root: Path,
    *,
    redis_url: str | None = None,
    progress_bar: bool | None = None,
    token: CancelToken | None = None,
) -> list[JobOutcome]:
    token = token or CancelToken()
    ctx = CorpusContext(artifacts_root=artifacts_root, config_maps=docs.config_maps)
    outcomes: list[JobOutcome] = []
    failed_tokenizers: dict[tuple[str, str], JobOutcome] = {}
    for resource in dependency_order(docs.resources):
        if resource.metadata.uid is None:
            resource.metadata.uid = str(uuid.uuid4())
        if isinstance(resource, TrainingRun):
            dep = failed_tokenizers.get(
                (resource.metadata.namespace, resource.spec.tokenizer_ref.name)
            )
            if dep is not None:
                message = f"TokenizerJob {dep.name} ended {dep.phase.value}: {dep.message}"
                logger.error(
                    "job_skipped",
                    kind=resource.kind,
                    name=resource.metadata.name,
                    reason="TokenizerFailed",
                    error=message,
                )
                outcomes.append(
                    JobOutcome(
                        kind=resource.kind,
                        name=resource.metadata.name,
                        phase=Phase.FAILED,
                        exit_code=EXIT_INVALID_INPUT,
                        out_dir=artifacts_root,
                        reason="TokenizerFailed",
                        message=message,
                    )
                )
                continue
        reporter = _reporter_for(resource, token, redis_url, progress_bar)
        try:
            result = run_job(resource, artifacts_root, ctx, reporter)
        finally:
            reporter.close()
        outcomes.append(result)
        if result.kind == "TokenizerJob" and result.phase is not Phase.SUCCEEDED:
            failed_tokenizers[(resource.metadata.namespace, resource.metadata.name)] = result
        if result.phase is Phase.CANCELLED:
            break
    return outcomes


def exit_code(outcomes: Sequence[JobOutcome]) -> int:
    for outcome in outcomes:
        if outcome.exit_code != EXIT_SUCCEEDED:
            return outcome.exit_code
    return EXIT_SUCCEEDED


def summary(outcomes: Sequence[JobOutcome]) -> str:
    lines = []
    for o in outcomes:
        lines.append(
            f"{o.kind}/{o.name}: {o.phase.value} in {o.duration_seconds:.1f}s"
            + (f" ({o.reason}: {o.message})" if o.phase is not Phase.SUCCEEDED else "")
        )
        if o.stats is not None:
            lines.append(
                f"  vocab {o.stats.vocab_size}, {o.stats.bytes_per_token:.3f} bytes/token"
                f" on the holdout, vocab used {o.stats.vocab_used_fraction:.1%}"
            )
        if o.eval is not None:
            lines.append(
                f"  holdout loss {o.eval.loss:.4f}, perplexity {o.eval.perplexity:.2f}, "
                f"bits/byte {o.eval.bits_per_byte:.4f} ({o.eval.tokens} tokens)"
            )
        if o.files:
            lines.append(f"  artifacts: {o.out_dir}")
            lines.extend(f"    {name}" for name in o.files)
    return "\n".join(lines) + "\n"


def run_files(paths: Sequence[Path], artifacts_root: Path, *, redis_url: str | None) -> int:
    docs = load_documents(paths)
    if not docs.resources:
        logger.error("nothing_to_run", files=[str(p) for p in paths])
        return EXIT_INVALID_INPUT
    token = CancelToken()
    token.install_signal_handlers()
    outcomes = run_documents(docs, artifacts_root, redis_url=redis_url, token=token)
    sys.stdout.write(summary(outcomes))
    sys.stdout.flush()
    return exit_code(outcomes)
